"""Pictures of a run (the loss curve) and of a comparison (one panel per measure). PNG via matplotlib's Agg."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (lines that do not parse are skipped)."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _save(fig, path: str) -> None:
    tmp = os.path.join(os.path.dirname(path) or ".", ".tmp-" + os.path.basename(path))
    fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    os.replace(tmp, path)


def plot_loss_curve(records: Sequence[dict[str, Any]], path: str, title: str = "") -> None:
    """Training loss per step (and its running mean), with validation loss/metric points where present."""
    plt = _pyplot()
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and "split" not in r and "step" in r]
    evals = [r for r in records if r.get("split") == "validation"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="#9ecae1", linewidth=1, label="train loss (step)")
        window = max(1, len(losses) // 20)
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, color="#08519c", linewidth=2, label=f"train loss (mean of {window})")
    if evals and any("loss" in r for r in evals):
        ax.plot([r["step"] for r in evals if "loss" in r], [r["loss"] for r in evals if "loss" in r], "o-",
                color="#d94801", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    acc = [r for r in evals if "accuracy" in r]
    if acc:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in acc], [r["accuracy"] for r in acc], "s--", color="#238b45",
                 label="validation accuracy")
        ax2.set_ylabel("accuracy")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="center right")
    ax.legend(loc="upper right")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def plot_comparison(rows: Sequence[dict[str, Any]], path: str, metric_name: str, title: str = "") -> None:
    """One bar panel per measure, one bar per method.

    Args:
        rows: Each with ``method``, ``trainable_params``, ``adapter_bytes``, ``peak_memory_bytes``,
            ``time_per_step_s``, ``metric_after`` and ``forgetting`` (missing/None values are left blank).
    """
    plt = _pyplot()
    panels = [
        ("trainable_params", "trainable parameters", 1.0),
        ("adapter_bytes", "adapter file (MB)", 1e-6),
        ("peak_memory_bytes", "peak memory (GB)", 1e-9),
        ("time_per_step_s", "time per step (s)", 1.0),
        ("metric_after", metric_name, 1.0),
        ("forgetting", "forgetting (nats/token)", 1.0),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    names = [r["method"] for r in rows]
    colors = plt.get_cmap("tab10").colors
    for ax, (key, label, scale) in zip(axes.flat, panels):
        values = [r.get(key) for r in rows]
        heights = [v * scale if isinstance(v, (int, float)) else 0.0 for v in values]
        bars = ax.bar(names, heights, color=[colors[i % len(colors)] for i in range(len(names))])
        for bar, v in zip(bars, values):
            text = "n/a" if not isinstance(v, (int, float)) else f"{v * scale:.3g}"
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title or "method comparison")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
