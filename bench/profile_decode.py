"""Where a decode step's time goes, on the lent GPU: prefill/decode timings with and without the
CUDA graph, the GPU time of one graph replay, capture time, and the torch profiler's top kernels
of an eager decode step and of a 512-token prefill.

    python3 bench/profile_decode.py MODEL.gguf
    CTX=16384 python3 bench/profile_decode.py MODEL.gguf   # the decode part at that depth, each of
                                                           # the first steps timed alone (captures)
"""
from __future__ import annotations

import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from ouzel.engine.generate import Sequence
from ouzel.loader import load


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main() -> None:
    path = sys.argv[1]
    dev = torch.device("cuda")
    model = load(path, device="cuda", progress=False).model
    ctx = int(os.environ.get("CTX", "0"))
    seq = Sequence(model, max(2048, ctx + 512), dev)
    ids = [(i * 7919) % 30000 + 10 for i in range(max(512, ctx))]
    seq.prefill(ids[:32])
    for t in (11, 12, 13, 14):
        seq.step(t)
    if ctx:
        _, dt = timed(lambda: seq.prefill(ids[:ctx]))
        print(f"prefill {ctx}: {dt:.2f} s = {ctx / dt:.0f} tok/s", flush=True)
        for i in range(6):
            _, dt = timed(lambda: seq.step(5))
            print(f"step {i} at {ctx + i}: {dt * 1e3:.1f} ms, captures "
                  f"{seq.graph.captures if seq.graph else '-'}", flush=True)
        ids = ids[:ctx]
    for r in range(0 if ctx else 3):
        seq.reset()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        seq.prefill(ids)
        host = time.perf_counter() - t0  # the host's time to queue the chunk (no sync inside)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        print(f"prefill 512 run {r}: {dt * 1e3:.1f} ms = {512 / dt:.0f} tok/s (host queued it in "
              f"{host * 1e3:.1f} ms)", flush=True)
    if seq.graph is not None:
        _, dt = timed(lambda: seq.step(5))
        print(f"first step after prefill (capture if the cache grew): {dt * 1e3:.1f} ms, captures {seq.graph.captures}")
        _, dt = timed(lambda: [seq.step(5) for _ in range(64)])
        print(f"graph decode: {dt / 64 * 1e3:.2f} ms/token = {64 / dt:.1f} tok/s", flush=True)
        g = seq.graph.graph
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(20):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        print(f"graph replay GPU time: {a.elapsed_time(b) / 20:.2f} ms", flush=True)
        graph, seq.graph = seq.graph, None
    _, dt = timed(lambda: [seq.step(5) for _ in range(16)])
    print(f"eager decode: {dt / 16 * 1e3:.2f} ms/token = {16 / dt:.1f} tok/s", flush=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            seq.step(5)
        torch.cuda.synchronize()
    if os.environ.get("SEQ"):  # the kernels of one step in launch order (the first SEQ of them)
        kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
        print(f"kernels per step: {len(kernels) // 2}")
        for e in kernels[: int(os.environ["SEQ"])]:
            print(f"  {e.time_range.elapsed_us():7.1f} us  {e.name[:90]}")
    from ouzel.kernels import cuda as kcuda
    print("GEMV configs chosen on first use (kernel, tag, type, n, k, rows, ... -> config):")
    for key, cfg in kcuda._TUNED.items():
        print(f"  {key[:5]} {key[5]} {key[7:]} -> {cfg}")
    print("eager decode step x2, top kernels by CUDA time:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))
    if ctx:
        return
    if os.environ.get("HOST"):  # where the host's time goes in a 512-token prefill (Python's profiler)
        import cProfile
        import pstats
        seq.reset()
        torch.cuda.synchronize()
        pr = cProfile.Profile()
        pr.enable()
        seq.prefill(ids)
        torch.cuda.synchronize()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)
        pstats.Stats(pr).sort_stats("cumtime").print_stats(40)
    seq.reset()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        seq.prefill(ids)
        torch.cuda.synchronize()
    print("Q8_0 prefill matmuls (n, k, groups, rows, dtype -> q8_gemm tile, None = cuBLAS):")
    for key, cfg in kcuda._Q8_TUNED.items():
        print(f"  {key} -> {cfg}")
    print("prefill 512, top kernels by CUDA time:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=70))


if __name__ == "__main__":
    main()
