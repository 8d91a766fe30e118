"""What `embedder eval` leaves behind: results.json and the PNG plots.

`results.json` holds every metric of every task at every Matryoshka size
(`tasks.TASK.metrics.DIM.METRIC`), the flat scalar names training logs
(`scalars`), and what was evaluated (model, step, sizes, cut-offs).
`matryoshka.png` plots each task's headline metrics against the size;
`training_curves.png` the run's loss, accuracy and eval metrics against step,
when the model is a checkpoint of a run that logged them. Every file is written
under a temporary name and renamed, and results.json last: a report that
failed half-way (a plot that could not be drawn) leaves no new results.json.
"""

from __future__ import annotations

import os
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
    fileio.write_json(
        written["json"],
        {**info, "tasks": _json_keys(results), "scalars": evaluation.scalars(results)},
    )
    return written


def _json_keys(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Sizes as string keys (JSON has no integer keys), largest first."""
    return {
        name: {**result, "metrics": {str(dim): values for dim, values in result["metrics"].items()}}
        for name, result in results.items()
    }
