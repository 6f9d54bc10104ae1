"""What one more dependent launch costs a captured decode step, on the lent GPU: the step's GPU time
(CUDA graph replays) as it is, then with every RMSNorm launched twice (the first result dropped, so
the step computes the same thing with one more kernel in the chain at each norm). The difference per
norm is what folding a norm into its neighbour can save at most (the router fold, OUZEL_NORM_ROUTER).

    python3 bench/stage_cost.py MODEL.gguf          # also: CTX=16384 for the step at that depth
"""
from __future__ import annotations

import os
import sys

import torch

from ouzel.engine.generate import Sequence
from ouzel.kernels import cuda
from ouzel.loader import load


def step_ms(model, ctx: int, reps: int = 50) -> float:
    """GPU time of one replayed decode step at depth ctx (median of 3 timings of `reps` replays)."""
    seq = Sequence(model, ctx + 64, torch.device("cuda"))
    seq.prefill([(i * 7919) % 30000 + 10 for i in range(ctx)])
    for t in (11, 12, 13):  # capture, then replays
        seq.step(t)
    graph = seq.graph.graph
    times = []
    for _ in range(3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / reps)
    return sorted(times)[1]


def main() -> None:
    model = load(sys.argv[1], device="cuda", progress=False).model
    ctx = int(os.environ.get("CTX", "512"))
    norms = []
    once = cuda.rms_norm

    def twice(*args, **kw):
        norms.append(1)
        once(*args, **kw)  # one more kernel in the chain, its result dropped
        return once(*args, **kw)

    base = step_ms(model, ctx)
    cuda.rms_norm = twice
    try:
        doubled = step_ms(model, ctx)
    finally:
        cuda.rms_norm = once
    again = step_ms(model, ctx)
    seq = Sequence(model, 64, torch.device("cuda"))  # the norms of one eager step, counted
    seq.graph = None
    seq.prefill([11, 12, 13])
    norms.clear()
    cuda.rms_norm = twice
    try:
        seq.step(14)
    finally:
        cuda.rms_norm = once
    per_step = len(norms)
    print(f"decode step at {ctx}: {base:.3f} ms; every RMSNorm launched twice: {doubled:.3f} ms; "
          f"as it was: {again:.3f} ms")
    if per_step:
        print(f"~{per_step} norms a step: {(doubled - (base + again) / 2) / per_step * 1e3:.2f} us per extra launch")


if __name__ == "__main__":
    main()
