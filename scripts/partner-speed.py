"""Where the 128 x 128 partner's time goes, and whether torch.compile shortens it (README, *Speed*).

One batch of 16 slices at the partner's grid, channels-last, under the precision the engine picks on this machine
(bf16 autocast where the CPU has fast bf16, else float32): eager milliseconds per slice, the operators that take
the time (torch.profiler, one call), the same with the math attention kernel and (where bf16 is used) in
float32, then the same network through torch.compile (its compile time, its speed and the largest difference in
its output).

    python scripts/partner-speed.py [--model SynomalyDetect/Resources/Models/brain-mri-axial-128.safetensors]
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from synomaly.modelio import load_model
from synomaly.device import autocast_dtype


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="SynomalyDetect/Resources/Models/brain-mri-axial-128.safetensors")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=4)
    args = ap.parse_args()
    m = load_model(args.model, device="cpu")
    g = m.card.grid_size
    net = m.network.eval().to(memory_format=torch.channels_last)
    dtype = autocast_dtype(torch.device("cpu"))
    torch.manual_seed(0)
    x = torch.randn(args.batch, 1, g, g).to(memory_format=torch.channels_last)
    t = torch.full((args.batch,), 100, dtype=torch.long)

    def scope(precision=dtype, attention=None):
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if precision is not None:
            stack.enter_context(torch.autocast("cpu", dtype=precision))
        if attention is not None:
            stack.enter_context(sdpa_kernel(attention))
        return stack

    def per_slice(f, **how) -> tuple[float, torch.Tensor]:
        with scope(**how):
            f(x, t)
            start = time.perf_counter()
            for _ in range(args.repeat):
                y = f(x, t)
        return (time.perf_counter() - start) / args.repeat / args.batch * 1000, y.float()

    eager, y_eager = per_slice(net)
    print(f"{m.card.name} at {g} x {g}, batch {args.batch}, channels-last, {dtype or torch.float32}, "
          f"{torch.get_num_threads()} threads: eager {eager:.1f} ms per slice")
    from torch.profiler import ProfilerActivity, profile

    with scope(), profile(activities=[ProfilerActivity.CPU]) as prof:
        net(x, t)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print("share of one call's CPU time: " + ", ".join(f"{e.key} {100 * e.self_cpu_time_total / total:.0f} %"
                                                       for e in events[:7]))
    math, y_math = per_slice(net, attention=SDPBackend.MATH)
    print(f"attention by the math kernel instead of flash attention: {math:.1f} ms per slice; largest output "
          f"difference {float((y_eager - y_math).abs().max()):.4f}")
    if dtype is not None:
        fp32, _ = per_slice(net, precision=None)
        print(f"float32 instead of {dtype}: {fp32:.1f} ms per slice ({fp32 / eager:.2f}x the time)")
    start = time.perf_counter()
    compiled = torch.compile(net, dynamic=False)
    with scope():
        compiled(x, t)
    compile_s = time.perf_counter() - start
    fast, y_fast = per_slice(compiled)
    again, _ = per_slice(net)
    print(f"torch.compile: {compile_s:.0f} s to compile, then {fast:.1f} ms per slice (eager again {again:.1f}); "
          f"largest output difference {float((y_eager - y_fast).abs().max()):.4f} "
          f"(mean |output| {float(y_eager.abs().mean()):.4f})")


if __name__ == "__main__":
    main()
