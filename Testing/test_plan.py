"""The execution plan (synomaly.plan): measured once per machine and model, remembered, and result-neutral."""

from __future__ import annotations

import json

import pytest
import torch

from synomaly import plan as planmod
from synomaly.detect import run_stages
from synomaly.modelio import build_network, load_model, save_model
from synomaly.train import new_card


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNOMALY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SYNOMALY_PLAN", raising=False)
    return tmp_path / "cache" / planmod.PLAN_FILE


def slices(n: int = 5, g: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    x = (torch.rand(n, 1, g, g, generator=gen) * 2 - 1) * 0.8
    mask = torch.zeros(n, 1, g, g)
    mask[..., 4:-4, 4:-4] = 1
    return x * mask - (1 - mask), mask


@pytest.mark.parametrize("t, draws", [(50, 1), ((20, 50), 2)])
def test_batch_size_and_memory_format_do_not_change_results(tiny_model_file, t, draws):
    """Each slice draws its noise from its own stream, so maps agree to float rounding whatever the batches,
    with a noise-level ensemble and several draws too, and slices stop at the same stage."""
    model = load_model(tiny_model_file, device="cpu", precision="fp32")
    x, mask = slices()
    runs = {}
    for batch, cl in ((1, False), (5, False), (2, True), (5, True)):
        model.channels_last = cl
        runs[(batch, cl)] = run_stages(model, x, mask, t=t, kernel=3, threshold=0.05, max_stages=4, tolerance=0.01,
                                       batch_size=batch, draws=draws, seed=7)
    ref = runs[(1, False)]
    assert int(ref.stages.max()) >= 2  # fusion and stopping are covered, not only stage 1
    for key, res in runs.items():
        assert torch.equal(res.stages, ref.stages), key
        assert (res.score - ref.score).abs().max() < 1e-4, key
        assert (res.healed - ref.healed).abs().max() < 1e-4, key


def test_a_slice_does_not_depend_on_the_other_slices(tiny_model_file):
    model = load_model(tiny_model_file, device="cpu", precision="fp32")
    x, mask = slices()
    everything = run_stages(model, x, mask, t=(20, 50), kernel=3, threshold=0.05, max_stages=3, batch_size=4, seed=1)
    alone = run_stages(model, x[:2], mask[:2], t=(20, 50), kernel=3, threshold=0.05, max_stages=3, batch_size=4,
                       seed=1)
    assert (everything.score[:2] - alone.score).abs().max() < 1e-4
    other_seed = run_stages(model, x[:2], mask[:2], t=(20, 50), kernel=3, threshold=0.05, max_stages=3, seed=2,
                            batch_size=4)
    assert (other_seed.score - alone.score).abs().max() > 1e-3  # the seed still matters


def test_plan_is_measured_once_then_read_from_the_cache(tiny_model_file, cache, monkeypatch):
    model = load_model(tiny_model_file, device="cpu", precision="fp32")
    first = planmod.execution_plan(model)
    assert first.source == "probe" and first.batch_size in planmod.CPU_BATCHES
    assert f"{first.batch_size}/{'cl' if first.channels_last else 'c'}" in first.trials
    assert min(first.trials.values()) == first.seconds_per_slice
    assert model.calls == 0 and model.call_seconds == 0.0  # probing is not counted as detection work
    assert model.channels_last == first.channels_last
    stored = json.loads(cache.read_text())
    assert list(stored) == [planmod.plan_key(model)]

    def no_probe(*args, **kwargs):
        raise AssertionError("the plan should have come from the cache")

    monkeypatch.setattr(planmod, "probe", no_probe)
    again = planmod.execution_plan(load_model(tiny_model_file, device="cpu", precision="fp32"))
    assert again.source == "cache"
    assert (again.batch_size, again.channels_last) == (first.batch_size, first.channels_last)


def test_another_network_gets_its_own_plan(tiny_model_file, cache, tmp_path):
    a = load_model(tiny_model_file, device="cpu", precision="fp32")
    card = new_card("other", grid=32, channels=(32, 64))
    path = save_model(tmp_path / "other.safetensors", card, build_network(card).state_dict())
    b = load_model(path, device="cpu", precision="fp32")
    assert planmod.plan_key(a) != planmod.plan_key(b)
    planmod.execution_plan(a)
    assert planmod.execution_plan(b).source == "probe"
    assert len(json.loads(cache.read_text())) == 2


def test_a_damaged_cache_is_measured_again(tiny_model_file, cache):
    cache.parent.mkdir(parents=True)
    model = load_model(tiny_model_file, device="cpu", precision="fp32")
    cache.write_text(json.dumps({planmod.plan_key(model): {"batch_size": "many"}}))
    assert planmod.execution_plan(model).source == "probe"
    cache.write_text("{not json")
    assert planmod.execution_plan(model, refresh=True).source == "probe"
    assert planmod.plan_key(model) in json.loads(cache.read_text())


def test_plan_default_skips_measuring(tiny_model_file, cache, monkeypatch):
    monkeypatch.setenv("SYNOMALY_PLAN", "default")
    model = load_model(tiny_model_file, device="cpu", precision="fp32")
    plan = planmod.execution_plan(model)
    assert (plan.batch_size, plan.source) == (8, "default")
    assert not cache.exists()


def test_probe_stops_past_the_fastest_batch(tiny_model_file, monkeypatch):
    """Larger batches are tried only while they are not clearly slower per slice than the best so far."""
    model = load_model(tiny_model_file, device="cpu", precision="fp32")
    cost = {1: 1.0, 2: 0.6, 4: 0.8, 8: 0.5, 16: 0.5, 32: 0.5}
    tried = []

    def fake(m, batch, t, gen):
        tried.append((batch, m.channels_last))
        return cost[batch] * (0.9 if m.channels_last else 1.0)

    monkeypatch.setattr(planmod, "_time_calls", fake)
    plan = planmod.probe(model)
    assert tried == [(1, False), (1, True), (2, False), (2, True), (4, False), (4, True)]
    assert (plan.batch_size, plan.channels_last) == (2, True)
    assert plan.seconds_per_slice == pytest.approx(0.54)


def test_bf16_changes_the_shipped_models_map_by_under_two_percent_and_its_segmentation_hardly():
    """The plan runs the network in bf16 on CPUs with AMX/AVX-512-bf16 (and on GPUs). The stated tolerance: the
    mean map moves by under 2 % and what is flagged stays over 0.95 Dice the same. Measured on an EPYC with
    AVX-512-bf16: here 0.7 % and 0.989; on the whole demo volume (smoothed, brain only) 0.2 % and a
    segmentation 0.998 Dice from fp32's (README, *Against the authors' loop*). Here: 24 slices of MNI152
    through the ventricles, the shipped volume setting's noise levels and blur, fp32 against bf16, same seed;
    the voxels above the fp32 map's 99th percentile (this brain is healthy, so the strict default flags
    nothing to compare)."""
    import numpy as np
    import SimpleITK as sitk

    from synomaly.prepare import prepare_scan
    from synomaly.sampledata import mni152_t1

    fp32 = load_model(precision="fp32", device="cpu")
    bf16 = load_model(precision="bf16", device="cpu")
    setting = fp32.card.detection_3d
    prep = prepare_scan(sitk.ReadImage(str(mni152_t1()), sitk.sitkFloat32), fp32.card)
    middle = prep.slices.shape[0] // 2
    x, mask = prep.slices[middle - 12:middle + 12], prep.masks[middle - 12:middle + 12]
    maps = [run_stages(m, x, mask, t=setting.noise_levels(), kernel=setting.blur_kernel, threshold=float("inf"),
                       max_stages=1, batch_size=8, seed=0).score.float() for m in (fp32, bf16)]
    inside = mask.bool()
    a, b = maps[0][inside], maps[1][inside]
    assert float((a - b).abs().mean() / a.mean()) < 0.02
    threshold = float(np.quantile(a.numpy(), 0.99))  # a level that flags something in a healthy brain
    fa, fb = a > threshold, b > threshold
    assert 2 * float((fa & fb).sum()) / float(fa.sum() + fb.sum()) > 0.95
