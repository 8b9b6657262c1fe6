"""The pictures are written (valid PNGs), whatever the numbers, including all-zero and missing ones."""

import struct

import pytest

from deltatune.training.plots import plot_comparison, plot_loss_curve


def png_size(path):
    with open(path, "rb") as fh:
        head = fh.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_loss_curve_with_validation_points(tmp_path):
    records = [{"step": 0, "split": "test", "event": "before", "accuracy": 0.3, "loss": 5.0}]
    records += [{"step": s, "loss": 3.0 / s} for s in range(1, 41)]
    records += [{"step": s, "split": "validation", "loss": 2.0 / s, "accuracy": 0.5 + s / 100} for s in (10, 20, 30)]
    path = tmp_path / "loss.png"
    plot_loss_curve(records, str(path), title="t")
    width, height = png_size(path)
    assert width > 300 and height > 200
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("n", [1, 3, 12])
def test_comparison_with_zero_and_missing_values(tmp_path, n):
    rows = [{"method": f"m{i}", "trainable_params": 1000 * i, "adapter_bytes": 4000 * i,
             "peak_memory_bytes": 4e8, "time_per_step_s": 0.1, "metric_before": 0.0, "metric_after": 0.0,
             "forgetting": -1e-6 * i if i % 2 else None} for i in range(n)]
    path = tmp_path / "cmp.png"
    plot_comparison(rows, str(path), metric_name="accuracy (after)")
    width, height = png_size(path)
    assert 800 < width < 3000 and 200 < height < 3000
