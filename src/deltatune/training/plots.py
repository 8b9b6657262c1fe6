"""Pictures of a run (the loss curve) and of a comparison (one panel per measure). PNG via matplotlib's Agg."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from deltatune.core.io import atomic_write


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
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))


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
    """One horizontal-bar panel per measure, one bar per method (readable with a dozen methods).

    Args:
        rows: Each with ``method``, ``trainable_params``, ``adapter_bytes``, ``peak_memory_bytes``,
            ``time_per_step_s``, ``metric_after``, ``metric_before`` and ``forgetting`` (missing/None values
            are drawn as "n/a"). The base model's metric (``metric_before``) is a dashed line.
    """
    plt = _pyplot()
    panels = [
        ("trainable_params", "trainable parameters", 1.0, "{:,.0f}"),
        ("adapter_bytes", "adapter file (MB)", 1e-6, "{:.3g}"),
        ("peak_memory_bytes", "peak memory (GB)", 1e-9, "{:.3g}"),
        ("time_per_step_s", "time per step (s)", 1.0, "{:.3g}"),
        ("metric_after", metric_name, 1.0, "{:.3f}"),
        ("forgetting", "forgetting (nats/token, lower is better)", 1.0, "{:+.3f}"),
    ]
    names = [r["method"] for r in rows]
    height = 1.0 + 0.32 * len(names)
    fig, axes = plt.subplots(2, 3, figsize=(14, 2 * height), sharey=True)
    colors = plt.get_cmap("tab20").colors
    y = list(range(len(names)))
    for ax, (key, label, scale, fmt) in zip(axes.flat, panels):
        values = [r.get(key) for r in rows]
        widths = [v * scale if isinstance(v, (int, float)) else 0.0 for v in values]
        ax.barh(y, widths, color=[colors[i % len(colors)] for i in y])
        base = None
        if key == "metric_after":
            base = next((r.get("metric_before") for r in rows if isinstance(r.get("metric_before"), (int, float))),
                        None)
            if base is not None:
                ax.axvline(base, color="black", linestyle="--", linewidth=1, label=f"base model {base:.3f}")
                ax.legend(loc="lower right", fontsize=7)
        # Explicit limits with room for the labels (all-zero or tiny values would collapse the axis).
        lo = min([0.0, *widths] + ([base] if base is not None else []))
        hi = max([0.0, *widths] + ([base] if base is not None else []))
        span = (hi - lo) or 1.0
        ax.set_xlim(lo - (0.3 * span if lo < 0 else 0.0), hi + 0.3 * span)
        for i, (w, v) in enumerate(zip(widths, values)):
            text = "n/a" if not isinstance(v, (int, float)) else fmt.format(v * scale)
            ax.text(w + 0.01 * span if w >= 0 else w - 0.01 * span, i, text, va="center",
                    ha="left" if w >= 0 else "right", fontsize=7)
        ax.set_title(label, fontsize=10)
        ax.set_yticks(y, names, fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    axes.flat[0].invert_yaxis()  # first method on top (the y axis is shared: invert once)
    fig.suptitle(title or "method comparison")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
