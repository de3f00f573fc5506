"""The authors' loop re-implemented as a speed baseline: same work as the engine, and a benchmark that prints both."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from synomaly.authorsloop import compare, engine_loop, authors_loop, host_map, opencv_kernel
from synomaly.filters import blur_kernel
from synomaly.modelio import load_model


def test_opencv_kernel_is_the_engine_blur():
    """The host blur uses the same Gaussian as the engine's map (OpenCV's sigma rule, reflect-101 borders)."""
    rng = np.random.default_rng(0)
    a = rng.random((24, 24)).astype(np.float32)
    b = rng.random((24, 24)).astype(np.float32)
    host = host_map(a, b, 5, 0.0)
    dev = (blur_kernel(torch.from_numpy(a)[None, None], 5) - blur_kernel(torch.from_numpy(b)[None, None], 5)).abs()
    assert np.allclose(host, dev[0, 0].numpy(), atol=1e-5)
    assert opencv_kernel(5).sum() == pytest.approx(1.0)


def test_small_spots_and_low_differences_are_removed():
    a = np.zeros((40, 40), np.float32)
    b = a.copy()
    b[5:7, 5:7] = 1.0  # 4 pixels: under 30 even after blurring with kernel 1
    b[20:30, 20:30] = 1.0  # 100 pixels
    m = host_map(a, b, 1, 0.5)
    assert m[5:7, 5:7].sum() == 0 and (m[20:30, 20:30] == 1).all() and m.sum() == 100


def test_both_loops_do_the_same_network_work(tiny_model_file):
    model = load_model(tiny_model_file, device="cpu", precision="fp32")
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 1, 32, 32, generator=gen) * 2 - 1
    mask = torch.ones_like(x0)
    a = authors_loop(model, x0, t=50, kernel=3, threshold=0.0, stages=4)
    e = engine_loop(model, x0, mask, t=50, kernel=3, threshold=0.0, stages=4, batch_size=2)
    assert a.network_slice_calls == e.network_slice_calls == 12
    assert 0 < a.network_seconds <= a.seconds and 0 < e.network_seconds <= e.seconds
    assert model.channels_last is False  # the baseline restores the model's memory format


def test_comparison_reports_both_times_and_their_ratio(tiny_model_file):
    model = load_model(tiny_model_file, device="cpu", precision="fp32")
    x0 = torch.zeros(2, 1, 32, 32)
    result = compare(model, x0, torch.ones_like(x0), t=50, kernel=3, stages=2, rounds=2)
    assert len(result.authors) == len(result.engine) == 2
    assert result.speedup == pytest.approx(result.per_slice_stage(result.authors) / result.per_slice_stage(result.engine))
    text = "\n".join(result.lines("cpu (float32)", "tiny"))
    assert "authors' loop" in text and "synomaly engine" in text and f"{result.speedup:.2f}x" in text
    assert 0 < result.gflop_per_slice_call < 10 and "GFLOP per slice-call" in text


def test_bench_authors_runs_on_the_command_line(tiny_model_file, synomaly_run):
    r = synomaly_run(["bench-authors", "--model", tiny_model_file, "--slices", "2", "--stages", "2",
                      "--rounds", "1", "--progress", "none"], timeout=300)
    assert r.returncode == 0, r.stderr
    assert "speed-up:" in r.stdout and "4 network slice-calls each" in r.stdout
