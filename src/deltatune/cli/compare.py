"""``deltatune compare``: train several methods on the same task, model and budget; tabulate and plot.

Each method trains in its own process (``deltatune train``), so its peak memory is its own. The
results land in ``<output-dir>/compare.md``, ``compare.csv`` and ``compare.png``; each method's run is
in ``<output-dir>/<method>/``. ``--resume`` skips finished methods and resumes an interrupted one.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import fields
from typing import Any

from deltatune.cli import common
from deltatune.cli import options as options_mod
from deltatune.cli import settings as settings_mod
from deltatune.cli.common import UsageError, human_bytes, human_time
from deltatune.cli.settings import RunSettings
from deltatune.cli.train import add_train_arguments, settings_from_args
from deltatune.core.io import atomic_write_text
from deltatune.training import plots

# A much shorter schedule per method than the single default job (about 5% of its training tokens), so
# that every method the library has fits the ~20 minute budget on a 2-core CPU. The point of compare is
# the trade-offs side by side on one budget, not each method's best score; pass --max-steps etc. for more.
COMPARE_RECIPES: dict[str, dict[str, Any]] = {
    "bbc-news": {"max_steps": 12, "batch_size": 4, "max_length": 128, "eval_samples": 40,
                 "forgetting_tokens": 1024},
    "chatterbot": {"max_steps": 12, "batch_size": 4, "max_length": 96, "eval_samples": 40,
                   "forgetting_tokens": 1024},
}
# Rows that are a method plus train options: QLoRA is LoRA over an NF4 (double-quantised) base.
VARIANTS: dict[str, list[str]] = {"qlora": ["--method", "lora", "--quantize", "nf4"]}
COLUMNS = ("method", "trainable_params", "total_params", "adapter_bytes", "peak_memory_bytes", "time_per_step_s",
           "metric_before", "metric_after", "forgetting", "train_time_s", "steps")


def register(subparsers) -> None:
    p = subparsers.add_parser("compare", help="train several methods on the same budget; table + plot",
                              usage="deltatune compare [--methods A,B,...] [train options] [method options]",
                              description="Train each method with the same model, data and schedule, then write "
                                          "compare.md, compare.csv and compare.png: trainable parameters, adapter "
                                          "size, peak memory, time per step, the task metric, and forgetting.")
    p.add_argument("--methods", default=argparse.SUPPRESS,
                   help="comma list (default: every method the library has, plus qlora = LoRA on an NF4 base "
                        "when bitsandbytes is installed)")
    add_train_arguments(p)
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from deltatune.quantization import bnb_available

    explicit = vars(args)
    methods_arg = explicit.pop("methods", None)
    table = options_mod.method_table()
    if methods_arg:
        methods = [m.strip() for m in methods_arg.split(",") if m.strip()]
    else:
        methods = list(table) + [v for v in VARIANTS if bnb_available() and "quantize" not in explicit]
    unknown = [m for m in methods if row_flags(m) is None]
    if unknown:
        raise UsageError(f"--methods: unknown method(s) {unknown}; choose from: "
                         f"{', '.join(sorted([*table, *VARIANTS]))}, or METHOD+INIT for a LoRA method with "
                         "init_lora_weights=INIT (e.g. lora+eva, dora+pissa)")
    if any(m in VARIANTS for m in methods) and "quantize" in explicit:
        raise UsageError("--quantize applies to every method of the comparison; drop it to get a separate qlora row")
    if "method" in explicit:
        raise UsageError("compare takes --methods (a comma list), not --method")
    names = set(options_mod.method_fields())
    settings = settings_from_args(args, names)
    data, model = settings.data, settings.model
    if "output_dir" not in settings.flags:
        stem = lambda s: os.path.splitext(os.path.basename(os.path.normpath(s)))[0]  # noqa: E731
        settings.output_dir = os.path.join("runs", f"compare-{stem(data)}-{stem(model)}")
    out = settings.output_dir
    child_config = child_settings(methods, settings, names)
    resume = bool(settings.resume)
    overwrite = bool(settings.overwrite)
    rows = []
    t0 = 0.0
    baseline = None  # the base model's metric, from the first run that measured it
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="deltatune-compare-") as tmp:
        for i, method in enumerate(methods, start=1):
            config_path = os.path.join(tmp, f"{method}.json")
            with open(config_path, "w", encoding="utf-8") as fh:
                json.dump(child_config[method], fh, default=str)
            run_dir = os.path.join(out, method)
            summary_path = os.path.join(run_dir, common.SUMMARY_NAME)
            if resume and os.path.exists(summary_path):
                print(f"[{i}/{len(methods)}] {method}: finished earlier, kept", flush=True)
            else:
                how = row_flags(method)
                cmd = [sys.executable, "-m", "deltatune", "train", "--config", config_path, *how,
                       "--output-dir", run_dir]
                if baseline is not None:  # the base model is the same for every method: evaluate it once
                    cmd.append("--no-eval-before")
                if resume and os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
                    cmd.append("--resume")
                elif overwrite or resume:
                    cmd.append("--overwrite")
                print(f"[{i}/{len(methods)}] {method}: deltatune train {' '.join(how)} --output-dir {run_dir}",
                      flush=True)
                code = subprocess.call(cmd)
                if code == 130 or code < 0:
                    print(f"deltatune: compare interrupted during {method}; continue with the same command "
                          "plus --resume", file=sys.stderr)
                    return 130
                if code == 2:  # bad input: every method would refuse it the same way
                    print(f"deltatune: error: compare stopped: {method} refused the options (see above)",
                          file=sys.stderr)
                    return 2
                if code != 0:  # one method crashing should not cost the others' results
                    print(f"[{i}/{len(methods)}] {method}: FAILED (exit {code}); going on with the others",
                          file=sys.stderr, flush=True)
                    failed.append(method)
                    rows.append({k: None for k in COLUMNS} | {"method": f"{method} (failed)", "metric": None})
                    continue
            summary = common.read_json(summary_path)
            if baseline is None and summary.get("metric_before") is not None:
                baseline = summary["metric_before"]
            rows.append({k: summary.get(k) for k in COLUMNS} | {"method": method, "metric": summary.get("metric")})
            t0 += summary.get("train_time_s") or 0.0
    for row in rows:
        if row["metric_before"] is None and row["trainable_params"] is not None:
            row["metric_before"] = baseline
    metric = next((r["metric"] for r in rows if r["metric"]), "metric")
    write_tables(rows, out, metric, title=f"{data} on {model}")
    print("\n" + markdown_table(rows, metric))
    if summary := trade_offs(rows, metric):
        print("\n" + summary)
    print(f"\nwrote {out}/compare.md, compare.csv, compare.png (training time {human_time(t0)} in all)")
    if failed:
        print(f"deltatune: error: {len(failed)} method(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def child_settings(methods: list[str], settings: RunSettings | dict[str, Any],
                   names: set[str]) -> dict[str, dict[str, Any]]:
    """The settings file each method's ``deltatune train`` child gets: the user's settings plus the shorter compare
    schedule where they set none, and of the method options only those the method takes
    (:func:`options_mod.shared_options_for`: OFT does not get LoRA's ``--r``).

    Raises:
        UsageError: a method option that no method in ``methods`` takes.
    """
    if not isinstance(settings, RunSettings):  # a dict of the same keys (``explicit`` for the flags)
        settings = RunSettings.from_layer(settings)
    explicit = settings.flags
    shared = dict(COMPARE_RECIPES.get(settings.data, {}))
    shared.update({k: v for k, v in explicit.items()
                   if k not in ("output_dir", "resume", "overwrite", "config", "method_options", "method")})
    options: dict[str, Any] = {}
    if "config" in explicit:
        from_file = settings_mod.load_config_file(explicit["config"])
        options.update({k: v for k, v in from_file.items() if k in names})
        shared.update({k: v for k, v in from_file.items() if k not in names and k != "method"})
    options.update(explicit.get("method_options", {}))
    per_method = {m: options_mod.shared_options_for(_method_of(m), options) for m in methods}
    unused = sorted(k for k in options if not any(k in taken for taken in per_method.values()))
    if unused:
        flags = ", ".join("--" + u.replace("_", "-") for u in unused)
        raise UsageError(f"{flags}: no method in --methods {','.join(methods)} takes this option")
    return {m: {**shared, **per_method[m]} for m in methods}


def row_flags(row: str) -> list[str] | None:
    """The ``deltatune train`` flags of a compare row: a method (``lora``), a :data:`VARIANTS` row (``qlora``), or
    ``METHOD+INIT``, a method that has ``init_lora_weights`` started with that initialisation (``lora+eva``,
    ``dora+pissa``); ``None`` for a row that is none of these."""
    if row in VARIANTS:
        return VARIANTS[row]
    table = options_mod.method_table()
    if row in table:
        return ["--method", row]
    method, plus, init = row.partition("+")
    if plus and init and method in table and "init_lora_weights" in {f.name for f in fields(table[method][0])}:
        return ["--method", method, "--init-lora-weights", init]
    return None


def _method_of(row: str) -> str:
    """The library method a compare row trains (``qlora`` -> ``lora``, ``lora+eva`` -> ``lora``)."""
    how = row_flags(row)
    return how[how.index("--method") + 1] if how else row




def markdown_table(rows: list[dict[str, Any]], metric: str) -> str:
    arrow = "higher is better" if metric == "accuracy" else "lower is better"
    head = ["method", "trainable params", "adapter file", "peak memory", "time/step",
            f"{metric} before", f"{metric} after ({arrow})", "forgetting (nats/token)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]

    def num(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    for r in rows:
        if r["trainable_params"] is None:
            lines.append("| " + " | ".join([r["method"]] + ["n/a"] * (len(head) - 1)) + " |")
            continue
        share = (100 * r["trainable_params"] / r["total_params"]) if r.get("total_params") else None
        lines.append("| " + " | ".join([
            r["method"], f"{r['trainable_params']:,d} ({num(share, '.2f')}%)", human_bytes(r["adapter_bytes"]),
            human_bytes(r["peak_memory_bytes"]), f"{num(r['time_per_step_s'], '.2f')} s",
            num(r["metric_before"], ".4f"), num(r["metric_after"], ".4f"), num(r["forgetting"], "+.4f"),
        ]) + " |")
    return "\n".join(lines)


def trade_offs(rows: list[dict[str, Any]], metric: str) -> str:
    """The table read for a choice: the best method on each column, and the Pareto front of the metric against
    trainable parameters (the methods that no other method beats on both)."""
    done = [r for r in rows if r.get("trainable_params") is not None and r.get("metric_after") is not None]
    if not done:
        return ""
    sign = 1 if metric == "accuracy" else -1  # +1: higher is better

    def best(key: str, fmt, high: bool = False) -> str:
        have = [r for r in done if r.get(key) is not None]
        if not have:
            return "n/a"
        r = (max if high else min)(have, key=lambda r: r[key])
        return f"{r['method']} ({fmt(r[key])})"

    front, best_so_far = [], None
    for r in sorted(done, key=lambda r: (r["trainable_params"], -sign * r["metric_after"])):
        if best_so_far is None or sign * r["metric_after"] > sign * best_so_far:
            front.append(r)
            best_so_far = r["metric_after"]
    lines = [
        f"- best {metric} after training: " + (best("metric_after", lambda v: f"{v:.4f}", high=sign > 0)),
        "- fewest trainable parameters: " + best("trainable_params", lambda v: f"{v:,d}"),
        "- smallest adapter file: " + best("adapter_bytes", human_bytes),
        "- least peak memory: " + best("peak_memory_bytes", human_bytes),
        "- fastest step: " + best("time_per_step_s", lambda v: f"{v:.2f} s"),
        "- least forgetting: " + best("forgetting", lambda v: f"{v:+.4f} nats/token"),
        f"- Pareto front, {metric} against trainable parameters (each is better than every method with fewer): "
        + ", ".join(f"{r['method']} ({r['trainable_params']:,d}, {r['metric_after']:.4f})" for r in front),
    ]
    return "\n".join(lines)


def write_tables(rows: list[dict[str, Any]], out: str, metric: str, title: str) -> None:
    os.makedirs(out, exist_ok=True)
    summary = trade_offs(rows, metric)
    atomic_write_text(os.path.join(out, "compare.md"), f"# {title}\n\n" + markdown_table(rows, metric) + "\n"
                      + (f"\n## Trade-offs\n\n{summary}\n" if summary else ""))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*COLUMNS, "metric"])
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k) for k in [*COLUMNS, "metric"]})
    atomic_write_text(os.path.join(out, "compare.csv"), buf.getvalue())
    plots.plot_comparison(rows, os.path.join(out, "compare.png"), metric_name=f"{metric} (after)", title=title)
