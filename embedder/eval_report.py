"""What `embedder eval` leaves behind: results.json and the PNG plots.

`results.json` holds every metric of every task at every Matryoshka size
(`tasks.TASK.metrics.DIM.METRIC`; with `--embedding_precision` also each
quantised index's metrics and memory, `tasks.TASK.precisions.PRECISION.metrics`
/ `.index_bytes`), the flat scalar names training logs
(`scalars`), and what was evaluated (model, step, sizes, cut-offs).
`matryoshka.png` plots each task's headline metrics against the size;
`training_curves.png` the run's loss, accuracy and eval metrics against step,
when the model is a checkpoint of a run that logged them. Every file is written
under a temporary name and renamed, and results.json last: a report that
failed half-way (a plot that could not be drawn) leaves no new results.json.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

from embedder import evaluation, fileio, plots

RESULTS_JSON = "results.json"
MATRYOSHKA_PNG = "matryoshka.png"
CURVES_PNG = "training_curves.png"


def write_report(
    output_dir: str,
    results: Mapping[str, Mapping[str, Any]],
    info: Mapping[str, Any],
    run_dir: str | None = None,
) -> dict[str, str]:
    """Writes results.json, matryoshka.png and (with a run that has curves) training_curves.png.

    Args:
      output_dir: the folder (created if missing).
      results: `evaluation.evaluate`'s output.
      info: what was evaluated (model path, step, dims, k values), stored in the JSON.
      run_dir: the training run's model dir, for its curves; None for an exported model.

    Returns:
      {"json": path, "matryoshka": path, "curves": path (only if drawn)}.
    """
    fileio.makedirs(output_dir)
    written = {
        "json": os.path.join(output_dir, RESULTS_JSON),
        "matryoshka": os.path.join(output_dir, MATRYOSHKA_PNG),
    }
    plots.plot_matryoshka(results, written["matryoshka"])
    if run_dir is not None:
        curves = plots.read_run_curves(run_dir)
        path = os.path.join(output_dir, CURVES_PNG)
        if plots.plot_training_curves(curves, path, title=os.path.abspath(run_dir)):
            written["curves"] = path
    fileio.write_text_atomically(
        written["json"],
        json.dumps(
            finite_or_null({**info, "tasks": _json_keys(results), "scalars": evaluation.scalars(results)}),
            indent=2,
            ensure_ascii=False,
            allow_nan=False,
        )
        + "\n",
    )
    return written


def finite_or_null(value: Any, where: str = "") -> Any:
    """`value` with every NaN / infinity replaced by None (JSON null), each named in a warning.

    A metric that is undefined for a model (e.g. a correlation of constant
    cosines) must not make results.json invalid JSON.
    """
    if isinstance(value, float) and not math.isfinite(value):
        print(f"warning: {where or 'a metric'} is {value} (undefined); written as null", file=sys.stderr)
        return None
    if isinstance(value, Mapping):
        return {k: finite_or_null(v, f"{where}/{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v, where) for v in value]
    return value


def _json_keys(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Sizes as string keys (JSON has no integer keys), largest first."""
    return {
        name: {**result, "metrics": {str(dim): values for dim, values in result["metrics"].items()}}
        for name, result in results.items()
    }
