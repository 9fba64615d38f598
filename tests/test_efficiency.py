"""The efficiency figure: AUROC against compute per slide, one point per embedding x grid, as the
paper's efficiency plot; checked on the plotted artists, not only on the returned table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from test_comparison import GRID_AUROC, GRID_COMPUTE, grid_inputs

import eagleflow.summary
from eagleflow.figures import COMPUTE_MEASURES, DEMO_TEXT, efficiency_figure
from eagleflow.h5io import write_h5
from eagleflow.summary import comparison_table, summarize_run

# embedding -> (tile forwards, seconds) per slide, as compute.csv says
COST = {
    row[0]: {"tile_forwards_per_slide": row[5], "seconds_per_slide": row[6]} for row in GRID_COMPUTE
}
DEMO = {"weights_demo": "true", "demo_weights": "titan"}


@pytest.fixture(scope="module")
def drawn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    comparison = comparison_table(*grid_inputs(demo=True))
    path = tmp_path_factory.mktemp("efficiency") / "efficiency.png"
    points, fig = efficiency_figure(comparison, DEMO, str(path))
    return {"comparison": comparison, "points": points, "fig": fig, "path": path}


def _panels(fig: Any) -> dict[tuple[str, str], Any]:
    """(set, measure) -> axes; titles are `<task>, <set>`, columns the compute measures."""
    axes = np.array(fig.axes).reshape(-1, len(COMPUTE_MEASURES))
    return {
        (ax.get_title().split(", ", 1)[1], measure): ax
        for row in axes
        for ax, measure in zip(row, COMPUTE_MEASURES, strict=True)
    }


def test_one_point_per_embedding_and_grid_in_each_panel(drawn):
    panels = _panels(drawn["fig"])
    assert set(panels) == {(s, m) for s in GRID_AUROC for m in COMPUTE_MEASURES}
    for (set_name, measure), ax in panels.items():
        assert ax.get_xscale() == "log"
        # a seconds_per_slide of 0 cannot sit on a log axis: left out of that panel only
        expected = {
            e: (COST[e][measure], auroc)
            for e, (auroc, _, _) in GRID_AUROC[set_name].items()
            if COST[e][measure] > 0
        }
        plotted = {c.get_gid(): c.get_offsets() for c in ax.collections if c.get_gid()}
        assert plotted.keys() == expected.keys(), (set_name, measure)
        for embedding, (x, y) in expected.items():
            np.testing.assert_allclose(plotted[embedding], [[x, y]])
    seconds = panels["crossval", "seconds_per_slide"]
    assert "meanpool_ctranspath@0.5mpp" not in {c.get_gid() for c in seconds.collections}
    # the returned table is what was drawn: one row per set, measure and embedding
    points = drawn["points"]
    assert not points.duplicated(["set", "measure", "embedding"]).any()
    assert len(points) == sum(
        len(c.get_offsets()) for ax in panels.values() for c in ax.collections if c.get_gid()
    )


def test_points_are_labelled_with_their_grid_and_carry_their_ci(drawn):
    ax = _panels(drawn["fig"])["crossval", "tile_forwards_per_slide"]
    labels = {t.get_text() for t in ax.texts}
    assert {"eagle 2 µm/px", "eagle 0.5 µm/px", "chief 0.5 µm/px", "titan 0.5 µm/px"} <= labels
    assert len(labels) == len(GRID_AUROC["crossval"])
    # the vertical bar of eagle@0.5mpp spans its 95% CI
    _, low, high = GRID_AUROC["crossval"]["eagle@0.5mpp"]
    x = COST["eagle@0.5mpp"]["tile_forwards_per_slide"]
    bars = [seg for bar in ax.containers for seg in bar.lines[2][0].get_segments()]
    assert any(np.allclose(seg, [[x, low], [x, high]]) for seg in bars)
    legend = {t.get_text() for t in ax.figure.axes[1].get_legend().get_texts()}
    assert legend == {"224 px at 2 µm/px", "224 px at 0.5 µm/px", "512 px at 0.5 µm/px"}


def test_demo_weights_are_on_the_figure(drawn, tmp_path: Path):
    assert drawn["path"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    banner = [t.get_text() for t in drawn["fig"].texts if DEMO_TEXT in t.get_text()]
    assert len(banner) == 1 and "titan" in banner[0]
    _, plain = efficiency_figure(
        drawn["comparison"], {"weights_demo": "false"}, str(tmp_path / "e.png")
    )
    assert not [t for t in plain.texts if DEMO_TEXT in t.get_text()]


def test_the_summary_labels_demo_weights_from_compute_csv(tmp_path: Path, monkeypatch):
    """patients.h5 says no demo weights, compute.csv says titan's: the figure says so."""
    seen: dict[str, Any] = {}

    def capture(comparison: pd.DataFrame, attrs: dict, path: str, params=None) -> None:
        seen["attrs"] = attrs
        Path(path).write_bytes(b"drawn")  # the drawing itself is tested above

    monkeypatch.setattr(eagleflow.summary, "efficiency_figure", capture)
    metrics, delong, compute = grid_inputs(demo=True)
    for name, table in (("metrics", metrics), ("delong", delong), ("compute", compute)):
        table.to_csv(tmp_path / f"{name}.csv", index=False)
    pd.DataFrame(columns=["task", "embedding", "head", "set", "k", "metric", "mean"]).to_csv(
        tmp_path / "fewshot.csv", index=False
    )
    write_h5(tmp_path / "p.h5", {"x": np.zeros(1)}, {"weights_demo": "false"})
    out = tmp_path / "out"
    summarize_run(
        [str(tmp_path / "metrics.csv")],
        [str(tmp_path / "fewshot.csv")],
        [str(tmp_path / "delong.csv")],
        str(tmp_path / "p.h5"),
        metrics_csv=str(out / "metrics.csv"),
        fewshot_csv=str(out / "fewshot.csv"),
        delong_csv=str(out / "delong.csv"),
        html_path=str(out / "metrics.html"),
        compute_csv=str(tmp_path / "compute.csv"),
        efficiency_png=str(out / "efficiency.png"),
    )
    assert seen["attrs"] == {"weights_demo": "true", "demo_weights": "titan"}
    assert "drawn" not in (out / "metrics.html").read_text()  # inlined as base64
    assert "ZHJhd24=" in (out / "metrics.html").read_text()
