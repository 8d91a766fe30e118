"""PNG plots of an evaluation: metric against Matryoshka size, and a run's training curves.

matplotlib draws with the Agg backend (files only, no display). A run's curves
come from `MODEL_DIR/metrics.jsonl`, or, when that is missing, from its
TensorBoard event files (`MODEL_DIR/tensorboard`); both hold the same scalars.
Files are written under a temporary name and renamed, so a reader never sees a
half-written PNG.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from embedder import evaluation, fileio, summaries

Curves = dict[str, list[tuple[int, float]]]

# eval/TASK/METRIC at the full size (no /dim_D suffix); TASK may itself hold a '/'.
_EVAL_METRIC = re.compile(r"^eval/(?P<task>.+)/(?P<metric>(?:ndcg|recall|mrr|map)@\d+|spearman|pearson)$")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: str) -> None:
    """Writes a matplotlib figure as PNG atomically (temporary name, then rename)."""
    fileio.write_atomically(
        path, lambda f: figure.savefig(f, format="png", dpi=110, bbox_inches="tight"), "wb"
    )


def plot_matryoshka(results: Mapping[str, Mapping[str, Any]], path: str) -> None:
    """Each task's headline metrics against the Matryoshka size (one panel per task).

    Args:
      results: `evaluation.evaluate`'s output.
      path: the PNG to write.
    """
    plt = _pyplot()
    figure, axes = plt.subplots(
        1, len(results), figsize=(5.5 * len(results), 4), squeeze=False, layout="constrained"
    )
    for ax, (name, result) in zip(axes[0], results.items(), strict=True):
        dims = sorted(result["metrics"])
        for metric in evaluation.headline_metrics(result):
            ax.plot(dims, [result["metrics"][d][metric] for d in dims], marker="o", label=metric)
        ax.set_xscale("log", base=2)
        ax.set_xticks(dims, [str(d) for d in dims])
        ax.minorticks_off()
        ax.set_xlabel("embedding dimension (Matryoshka prefix)")
        ax.set_ylabel("metric")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(figure, path)
    plt.close(figure)


def curves_from_rows(rows: Sequence[Mapping[str, Any]]) -> Curves:
    """{scalar name: [(step, value), ...]} of logged rows ({"step": N, name: value, ...});
    a step logged twice (a resumed run) keeps its last value."""
    by_name: dict[str, dict[int, float]] = {}
    for row in rows:
        step = int(row["step"])
        for name, value in row.items():
            if name != "step":
                by_name.setdefault(name, {})[step] = float(value)
    return {name: sorted(points.items()) for name, points in by_name.items()}


def read_metrics_jsonl(model_dir: str) -> Curves:
    """The curves of MODEL_DIR/metrics.jsonl (read by `summaries.read_metrics`)."""
    return curves_from_rows(summaries.read_metrics(model_dir))


def read_event_files(model_dir: str) -> Curves:
    """The same from the TensorBoard event files under MODEL_DIR/tensorboard."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    accumulator = event_accumulator.EventAccumulator(
        os.path.join(model_dir, "tensorboard"),
        size_guidance={event_accumulator.TENSORS: 0, event_accumulator.SCALARS: 0},
    )
    accumulator.Reload()
    by_name: dict[str, dict[int, float]] = {}
    tags = accumulator.Tags()
    for tag in tags.get(event_accumulator.TENSORS, []):
        for event in accumulator.Tensors(tag):
            value = tensor_util.make_ndarray(event.tensor_proto)
            if value.dtype.kind in "fiu":  # text summaries (the MFU peak's source) are not curves
                by_name.setdefault(tag, {})[event.step] = float(value)
    for tag in tags.get(event_accumulator.SCALARS, []):
        for event in accumulator.Scalars(tag):
            by_name.setdefault(tag, {})[event.step] = float(event.value)
    return {name: sorted(points.items()) for name, points in by_name.items()}


def read_run_curves(model_dir: str) -> Curves:
    """A run's scalars: metrics.jsonl if present, else the event files; {} if neither."""
    if fileio.exists(os.path.join(model_dir, summaries.METRICS_FILE)):
        return read_metrics_jsonl(model_dir)
    if fileio.isdir(os.path.join(model_dir, "tensorboard")):
        return read_event_files(model_dir)
    return {}


def plot_training_curves(curves: Curves, path: str, title: str = "") -> bool:
    """Loss (each Matryoshka size too), in-batch accuracy and the eval metrics against step.

    Args:
      curves: {scalar name: [(step, value), ...]} (`read_run_curves`).
      path: the PNG to write.
      title: above the panels.

    Returns:
      False (and writes nothing) when there is no loss curve to draw.
    """
    losses = sorted((n for n in curves if n == "loss" or n.startswith("loss/")), key=_natural)
    if not losses:
        return False
    eval_tasks: dict[str, list[str]] = {}
    for name in curves:
        match = _EVAL_METRIC.match(name)
        if match:
            eval_tasks.setdefault(match["task"], []).append(name)
    panels: list[tuple[str, list[str]]] = [("loss", losses)]
    if "accuracy" in curves:
        panels.append(("in-batch accuracy", ["accuracy"]))
    panels += [(f"eval: {task}", _headline(names)) for task, names in sorted(eval_tasks.items())]
    plt = _pyplot()
    figure, axes = plt.subplots(
        1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False, layout="constrained"
    )
    for ax, (panel, names) in zip(axes[0], panels, strict=True):
        for name in names:
            steps, values = zip(*curves[name], strict=True)
            marker = "o" if panel.startswith("eval") else None
            ax.plot(steps, values, marker=marker, label=name.rsplit("/", 1)[-1] if "/" in name else name)
        ax.set_xlabel("step")
        ax.set_title(panel)
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    save_figure(figure, path)
    plt.close(figure)
    return True


def _natural(name: str) -> tuple:
    """Sort key: "loss" first, then "loss/dim_64" before "loss/dim_128"."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def _headline(names: list[str]) -> list[str]:
    """Of one task's eval curves, those at the cut-off nearest 10 in report order (all, for STS)."""
    ks = sorted({int(n.rsplit("@", 1)[1]) for n in names if "@" in n})
    if not ks:
        return sorted(names)
    k = min(ks, key=lambda x: (abs(x - 10), x))
    order = {metric: i for i, metric in enumerate(evaluation.RETRIEVAL_METRICS)}
    chosen = [n for n in names if n.endswith(f"@{k}")]
    return sorted(chosen, key=lambda n: order[n.rsplit("/", 1)[1].split("@")[0]])
