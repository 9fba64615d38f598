"""The skeleton every per-batch model stage shares (tile encoders, CHIEF, EAGLE's top-k, slide
encoders): resolve the weights, decide which slides are up to date, load each model once, compute,
write each slide's file with the same provenance, write the batch manifest.

A stage contributes only what is its own: how to read its input, which model a slide needs and
the computation (`compute`), which yields each slide's datasets and attributes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from eagleflow.batches import is_up_to_date, stage_params_sha256, write_manifest
from eagleflow.h5io import write_h5
from eagleflow.models.catalog import model_files
from eagleflow.provenance import provenance_attrs
from eagleflow.weights import WeightsInfo, resolve_configured, weights_attrs

log = logging.getLogger(__name__)

Shapes = Mapping[str, tuple[int | str | None, ...]]
Writer = Callable[[str, dict[str, np.ndarray], dict[str, Any]], Any]


@dataclass(frozen=True)
class StageOutput:
    """A stage's per-slide file: its format, dataset shapes and writer."""

    format: str
    shapes: Shapes
    write: Writer = write_h5


@dataclass
class Pending:
    """A slide whose output is missing or stale: its row, its input's attributes, its model."""

    slide: dict[str, Any]
    input_attrs: Mapping[str, Any]
    model: str
    params_sha256: str


@dataclass
class Models:
    """The job's models, each loaded at first use and kept for every later slide."""

    infos: Mapping[str, WeightsInfo]
    device: Any
    loaded: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        if name not in self.loaded:
            from eagleflow.models.loading import load_model

            # the info is already hashed and checked: the file is not read twice
            self.loaded[name] = load_model(name, self.infos[name], device=self.device)
        return self.loaded[name]


Compute = Callable[[list[Pending], Models], Iterator[tuple[Pending, dict[str, np.ndarray], dict]]]


def resolve_device(device: str) -> Any:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available on this node")
    return torch.device(device)


def configure_torch(threads: int, seed: int = 0) -> None:
    """Same threads and seed every run, so CPU outputs are bit-identical between runs."""
    import torch

    torch.set_num_threads(max(1, threads))
    torch.manual_seed(seed)


def upstream_weights(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The weight records of the models that made a stage's input (carried down every file)."""
    return {
        key: value
        for key, value in attrs.items()
        if key.endswith(("_weights_demo", "_weights_sha256"))
    }


def precision(device: Any) -> str:
    return "fp32" if getattr(device, "type", str(device)) == "cpu" else "bf16 autocast"


def run_model_stage(
    rule: str,
    slides: Sequence[dict[str, Any]],
    *,
    input_key: str | None,
    read_input: Callable[[Any], Mapping[str, Any]],
    model_of: Callable[[dict[str, Any]], str],
    models_cfg: Mapping[str, Mapping[str, Any]],
    settings: Mapping[str, Any],
    output: StageOutput,
    compute: Compute,
    manifest: str,
    device: str = "cpu",
    threads: int = 1,
    what: str = "output",
) -> None:
    """Run one batch job of a model stage; `slides` rows carry `slide_id`, `output`, `input_key`
    (read_input gets `slide[input_key]`, or the whole row when input_key is None: a bag).

    `settings` are what change the stage's results (they enter each file's params_sha256 with
    the stage's code and the weights); finished, valid, same-input outputs are kept.
    """
    configure_torch(threads)
    needed = list(dict.fromkeys(model_of(slide) for slide in slides))
    infos = {name: resolve_configured(name, models_cfg[name]) for name in needed}
    params_sha256 = {
        name: stage_params_sha256(rule, str(infos[name].sha256), model_files([name]), **settings)
        for name in needed
    }
    todo = []
    upstream_demo = False
    for slide in slides:
        attrs = read_input(slide if input_key is None else slide[input_key])
        upstream_demo |= any(
            value == "true"
            for key, value in upstream_weights(attrs).items()
            if key.endswith("_demo")
        )
        model = model_of(slide)
        if is_up_to_date(
            slide["output"],
            output.format,
            output.shapes,
            params_sha256[model],
            str(attrs["content_sha256"]),
        ):
            log.info("%s: %s up to date, skipped", slide["slide_id"], what)
        else:
            todo.append(Pending(slide, attrs, model, params_sha256[model]))
    if todo:
        torch_device = resolve_device(device)
        models = Models(infos, torch_device)
        for pending, datasets, attrs in compute(todo, models):
            info = infos[pending.model]
            output.write(
                pending.slide["output"],
                datasets,
                {
                    **attrs,
                    **upstream_weights(pending.input_attrs),
                    "model": pending.model,
                    **weights_attrs(info),
                    "weights_demo": "true" if info.is_demo else "false",
                    "device": str(torch_device),
                    "precision": precision(torch_device),
                    "params_sha256": pending.params_sha256,
                    "input_sha256": str(pending.input_attrs["content_sha256"]),
                    **provenance_attrs(rule, dict(settings), model_files([pending.model])),
                },
            )
            log.info("%s: %s -> %s", pending.slide["slide_id"], what, pending.slide["output"])
    demo = upstream_demo or any(info.is_demo for info in infos.values())
    write_manifest(manifest, slides, demo)
