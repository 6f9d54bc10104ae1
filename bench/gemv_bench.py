"""Time the decode GEMVs (M = 1) on the lent GPU: every config of the word-load Q4_K kernel and of
the generic block decoder, on the llama8b and qwen3moe shapes, and the MoE form (8 (token, expert)
pairs over 128 stacked experts). Weights rotate over > 256 MB so L2 can't hold them.

    python3 bench/gemv_bench.py
    TYPES=Q8_0,Q8_0_R8 python3 bench/gemv_bench.py   # GGUF's Q8_0 beside its load-time regrouping
    TYPES=Q2_K,Q2_K_R8,IQ2_XXS,IQ2_XXS_R8 python3 bench/gemv_bench.py   # DeepSeek V4's expert types
    SWEEP=1 MOE_ONLY=1 TYPES=IQ2_XXS_R8,Q2_K_R8 python3 bench/gemv_bench.py   # their MoE configs
"""
from __future__ import annotations

import torch
from triton.testing import do_bench, do_bench_cudagraph

from ouzel.kernels import cuda as ocuda
from ouzel.kernels.triton import gguf as G
from ouzel.kernels.triton import q8act as Q8
from ouzel.kernels.triton.testing import random_blocks, reference_linear, rel_err
from ouzel.quant import blocks
from ouzel.quant.blocks import block_type

import itertools
import os

SHAPES = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (128256, 4096))
# DeepSeek V4 Flash's Q8_0 matrices (q_a, kv, shared gate/up and down, q_b, o_b, output head)
V4_SHAPES = ((1024, 4096), (512, 4096), (2048, 4096), (4096, 2048), (32768, 1024), (4096, 8192), (129280, 4096))
# the sweep (SWEEP=1): tile rows, steps per iteration, pipelining stages, grid size target for the K split
SWEEP = [dict(bn=bn, u=u, stages=st, target=tg) for bn, u, st, tg in
         itertools.product((4, 16), (2, 4, 8), (1, 3), (264, 2048))]
SWEEP_Q8 = [dict(bn=bn, u=u, num_warps=w, target=tg, m1=True) for bn, u, w, tg in
            itertools.product((8, 16, 32, 64), (1, 2, 4), (4, 8), (264, 528, 1024)) if 16 <= bn * u <= 128]

# Q2_K_R8 / IQ2_XXS_R8 (SWEEP=1): one 16-byte load per thread and step or more
SWEEP_R8 = [dict(bn=bn, u=u, num_warps=w, target=tg) for bn, u, w, tg in
            itertools.product((8, 16, 32, 64), (1, 2, 4), (4, 8), (264, 1024)) if 8 * w <= bn * u <= 128]


def bench_us(fn) -> float:
    """GPU time of fn, replayed in a CUDA graph (eager timing of a 10 us kernel is Python's)."""
    return do_bench_cudagraph(fn, rep=40, return_mode="median") * 1e3


def random_raw(name, rows, k, gen):
    """Random blocks of a GGUF type, or of its base type regrouped (`*_R8`: as the loader does)."""
    if name.endswith("_R8"):
        return getattr(blocks, f"repack_{name.lower()}")(random_blocks(name[:-3], rows, k, gen, "cuda"))
    return random_blocks(name, rows, k, gen, "cuda")


def rotated(name, rows, k, gen, nbytes):
    raw0 = random_raw(name, rows, k, gen)
    copies = max(2, -(-256 * 2**20 // nbytes))
    return [raw0] + [raw0.clone() for _ in range(copies - 1)]


def dense(name, n, k, gen, bw) -> None:
    nbytes = n * block_type(name).row_bytes(k)
    raws = rotated(name, n, k, gen, nbytes)
    x = torch.randn(1, k, generator=gen).cuda()
    ref = reference_linear(x, raws[0], name)
    sweep = bool(os.environ.get("SWEEP"))
    kinds = [] if (os.environ.get("INT8_ONLY") and name in Q8.SUPPORTED) or not G.supports(name) else \
        [("fp32 x", G.qgemv, SWEEP if sweep else ocuda.GEMV_CONFIGS, ref)]
    if name in Q8.SUPPORTED:  # its oracle: the exact product with the int8-rounded x
        xd = Q8.dequantized_x(*Q8.quantize_x(x)[:2])
        kinds.append(("int8 x", Q8.qgemv_q8, SWEEP_Q8 if sweep else ocuda.Q8_TYPE_CONFIGS[name],
                      reference_linear(xd, raws[0], name)))
    for label, fn, configs, want in kinds:
        res = []
        for c in configs:
            err = rel_err(fn(x, raws[0], name, (n, k), **c), want)
            assert err < 1e-5, (name, n, k, c, err)
            it = iter(range(1 << 62))
            res.append((bench_us(lambda c=c: fn(x, raws[next(it) % len(raws)], name, (n, k), **c)), c))
        res.sort(key=lambda r: r[0])
        t, c = res[0]
        print(f"{name} {label} {n:6d}x{k:<6d} {nbytes / 1e6:7.1f} MB best {t:7.1f} us "
              f"{nbytes / t / 1e3:5.0f} GB/s ({nbytes / t / 1e3 / bw:4.0%} of copy bw) {c} | "
              + " ".join(f"{r[0]:.0f}" for r in res[1:4]), flush=True)


def moe(name, E, n, k, pairs, x_div, gen, bw) -> None:
    bt = block_type(name)
    nbytes_all = E * n * bt.row_bytes(k)
    raws = rotated(name, E * n, k, gen, nbytes_all)
    idx = torch.randperm(E, generator=gen)[:pairs].cuda()
    x = torch.randn(pairs // x_div, k, generator=gen).cuda()
    ref = torch.stack([reference_linear(x[p // x_div][None], raws[0][idx[p] * n:(idx[p] + 1) * n], name)[0]
                       for p in range(pairs)])
    read = pairs * n * bt.row_bytes(k)
    q8 = name in Q8.SUPPORTED
    fn, configs = (Q8.qgemv_q8, ocuda.Q8_TYPE_CONFIGS[name]) if q8 else (G.qgemv, ocuda.GEMV_CONFIGS)
    if os.environ.get("SWEEP") and name in ("Q2_K_R8", "IQ2_XXS_R8"):
        configs = SWEEP_R8
    if fn is Q8.qgemv_q8:
        xd = Q8.dequantized_x(*Q8.quantize_x(x)[:2])
        ref = torch.stack([reference_linear(xd[p // x_div][None], raws[0][idx[p] * n:(idx[p] + 1) * n], name)[0]
                           for p in range(pairs)])
    res = []
    for c in configs:
        err = rel_err(fn(x, raws[0], name, (n, k), idx=idx, x_div=x_div, **c), ref)
        assert err < 1e-5, (name, c, err)
        it = iter(range(1 << 62))
        res.append((bench_us(lambda c=c: fn(x, raws[next(it) % len(raws)], name, (n, k), idx=idx, x_div=x_div, **c)), c))
    res.sort(key=lambda r: r[0])
    t, c = res[0]
    print(f"MoE {name} {pairs} pairs of {E}x[{n}x{k}] read {read / 1e6:5.1f} MB best {t:6.1f} us "
          f"{read / t / 1e3:5.0f} GB/s ({read / t / 1e3 / bw:4.0%}) {c} | "
          + " ".join(f"{r[0]:.1f} {r[1]}" for r in res[1:6]), flush=True)


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    bw = 2 * a.numel() / (bench_us(lambda: b.copy_(a)) / 1e6) / 1e9
    print(f"copy bandwidth {bw:.0f} GB/s (read + write)", flush=True)
    del a, b
    gen = torch.Generator().manual_seed(0)
    types = os.environ.get("TYPES", "Q4_K,Q6_K,Q8_0,Q2_K,IQ2_XXS").split(",")
    for name in types if not os.environ.get("MOE_ONLY") else ():
        for n, k in SHAPES + (V4_SHAPES if name.startswith("Q8_0") else ()):
            dense(name, n, k, gen, bw)
    for name in [t for t in types if t in ("Q4_K", "Q6_K")]:
        moe(name, 128, 768, 2048, 8, 8, gen, bw)   # gate (or up): one token, 8 experts
        moe(name, 128, 2048, 768, 8, 1, gen, bw)   # down: 8 pairs, each its own input
    # ds4flash's routed experts: 6 of 256, gate/up IQ2_XXS (one stack at load: [gate_e; up_e] 4096 rows), down Q2_K
    for name in [t for t in types if t.startswith("IQ2_XXS")]:
        moe(name, 256, 4096, 4096, 6, 6, gen, bw)
    for name in [t for t in types if t.startswith("Q2_K")]:
        moe(name, 256, 4096, 2048, 6, 1, gen, bw)


if __name__ == "__main__":
    main()
