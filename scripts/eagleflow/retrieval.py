"""Patient retrieval: cosine similarity of patient embeddings, nearest patients and similarity matrices."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import matplotlib
import numpy as np
import pandas as pd

from eagleflow.figures import figure_grid, finish_figure
from eagleflow.h5io import write_csv
from eagleflow.task_data import read_patient_embeddings

matplotlib.use("Agg")


log = logging.getLogger(__name__)


def cosine_similarity_matrix(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = x / np.where(norms == 0, 1.0, norms)
    return unit @ unit.T


def retrieval_table(
    patients: pd.DataFrame, arrays: Mapping[str, np.ndarray], top: int
) -> pd.DataFrame:
    """Every patient as a query: its `top` most similar other patients per embedding."""
    rows = []
    for name, x in arrays.items():
        similarity = cosine_similarity_matrix(x)
        np.fill_diagonal(similarity, -np.inf)
        for q in range(len(patients)):
            # stable sort on the negated row: equal similarities keep patient order
            order = np.argsort(-similarity[q], kind="stable")[: min(top, len(patients) - 1)]
            for rank, match in enumerate(order, start=1):
                rows.append(
                    {
                        "embedding": name,
                        "query_patient": patients["PATIENT"].iat[q],
                        "query_cohort": patients["COHORT"].iat[q],
                        "rank": rank,
                        "match_patient": patients["PATIENT"].iat[match],
                        "match_cohort": patients["COHORT"].iat[match],
                        "similarity": float(similarity[q, match]),
                    }
                )
    return pd.DataFrame(rows)


def patient_retrieval(
    patients_h5: str, params: Mapping[str, Any], table_csv: str, figure_png: str
) -> None:
    """The `evaluation_retrieval` rule: top matches per query patient, and similarity matrices."""
    names = list(params["embeddings"])
    patients, arrays, attrs = read_patient_embeddings(patients_h5, names)
    table = retrieval_table(patients, arrays, int(params["top"]))
    write_csv(table, table_csv)
    retrieval_figure(patients, arrays, attrs, figure_png, dict(params))
    for name in names:
        same = table[table["embedding"] == name]
        if not same.empty:
            log.info(
                "%s: %.0f%% of top-%d matches are from the query's cohort",
                name,
                100 * np.mean(same["query_cohort"] == same["match_cohort"]),
                int(params["top"]),
            )


def retrieval_figure(
    patients: pd.DataFrame,
    arrays: Mapping[str, np.ndarray],
    attrs: Mapping[str, Any],
    path: str,
    params: Mapping[str, Any],
) -> None:
    """Cosine similarity matrices of the patients (ordered by cohort), one panel per embedding."""
    order = np.lexsort((patients["PATIENT"].to_numpy(), patients["COHORT"].to_numpy()))
    fig, axes = figure_grid(1, len(arrays), width=5.4, height=5.0)
    n = len(patients)
    for col, (name, x) in enumerate(arrays.items()):
        ax = axes[0, col]
        similarity = cosine_similarity_matrix(x[order])
        image = ax.imshow(similarity, cmap="viridis", interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
        if n <= 40:
            ticks = patients["PATIENT"].to_numpy()[order]
            ax.set_xticks(range(n), ticks, rotation=90, fontsize=6)
            ax.set_yticks(range(n), ticks, fontsize=6)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        cohorts = patients["COHORT"].to_numpy()[order]
        for boundary in np.flatnonzero(cohorts[1:] != cohorts[:-1]) + 0.5:
            ax.axhline(boundary, color="white", lw=1)
            ax.axvline(boundary, color="white", lw=1)
        ax.set_title(f"{name} (top-{params['top']} matches in retrieval.csv)", fontsize=9)
    finish_figure(
        fig,
        "Patient retrieval: cosine similarity, all cohorts pooled (ordered by cohort)",
        attrs,
        path,
        "evaluation_retrieval",
        dict(params),
    )
