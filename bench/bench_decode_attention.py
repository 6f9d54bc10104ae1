"""Time the Triton flash-decoding kernel against torch SDPA with a length mask (CUDA only).

B=1, H=32, Hkv=8, D=128 (Llama-3-8B), bf16 q and cache, full length at capacities 4096, 16384,
32768, plus a short length in the largest capacity (the grid stays sized by capacity). Each timed
call reads one of several cache copies (> 256 MB in all) so L2 (50 MB on H100) can't hold them.
Prints us per call and GB/s of K/V read (the bytes of the visible keys), eager and in a CUDA graph
(the way the decode loop runs it), and a sweep of block_n / splits / num_warps.

    python3 bench/bench_decode_attention.py [--quick]
    python3 bench/bench_decode_attention.py --step   # the decode step's attention as the models run it

--step: fp32 q (the activations' dtype) on a float16 cache, the new token's k/v stored by the
kernel, at Llama-3-8B's heads (32 / 8) and Qwen3-30B-A3B's (32 / 4), a tg128 context (600 keys in a
1024 cache) and a 16k one: the three launches of before (`rope_qk`, the attention, `quantize_x`
of its output for o_proj) against the one kernel doing all three (rope=, q8=), at 4 and 8 warps.
"""
from __future__ import annotations

import argparse
import itertools
import sys

import torch
import torch.nn.functional as F

from ouzel.kernels.triton.attention import decode_attention, decode_attention_reference
from ouzel.kernels.triton.testing import rel_err

B, H, HKV, D = 1, 32, 8, 128
DT = torch.bfloat16
DEV = "cuda"
SWEEP = [dict(block_n=bn, splits=s, num_warps=w) for bn, s, w in
         itertools.product((32, 64, 128), (None, 16, 32, 64), (4, 8))]


def bench_us(fn, copies: int, graph: bool) -> float:
    """Median microseconds of one call; fn(i) uses cache copy i."""
    from triton.testing import do_bench, do_bench_cudagraph
    run_all = lambda: [fn(i) for i in range(copies)]  # noqa: E731
    if graph:
        ms = do_bench_cudagraph(run_all, rep=100, return_mode="median")
    else:
        ms = do_bench(run_all, warmup=10, rep=100, return_mode="median")
    return ms * 1e3 / copies


def copy_bw() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    return 2 * a.numel() / (bench_us(lambda i: b.copy_(a), 1, False) * 1e-6)


def sdpa(q, k, v, mask, scale):
    """torch's path: [1, H, 1, D] x [1, Hkv, C, D] with a [1, 1, 1, C] bool mask, GQA in SDPA."""
    out = F.scaled_dot_product_attention(q[:, :, None], k.permute(1, 0, 2)[None], v.permute(1, 0, 2)[None],
                                         attn_mask=mask, scale=scale, enable_gqa=True)
    return out[:, :, 0]


def case(C: int, length: int, bw: float, gen: torch.Generator, quick: bool) -> bool:
    kv_bytes = 2 * length * HKV * D * DT.itemsize
    copies = max(2, -(-256 * 2**20 // (2 * C * HKV * D * DT.itemsize)))
    ks = [torch.randn(C, HKV, D, generator=gen).to(DEV, DT) for _ in range(copies)]
    vs = [torch.randn(C, HKV, D, generator=gen).to(DEV, DT) for _ in range(copies)]
    q = torch.randn(B, H, D, generator=gen).to(DEV, DT)
    lengths = torch.tensor([length], dtype=torch.int32, device=DEV)
    scale = D ** -0.5
    out = torch.empty_like(q)

    ref = decode_attention_reference(q, ks[0], vs[0], lengths, scale)
    err = rel_err(decode_attention(q, ks[0], vs[0], lengths, scale), ref)
    ok = err < 1e-2
    print(f"{'ok  ' if ok else 'FAIL'} C={C} len={length}: rel err {err:.2e} vs reference")

    def row(name, us):
        floor = kv_bytes / bw * 1e6  # us to read K/V at the copy bandwidth
        print(f"  {name:44s} {us:8.1f} us  {kv_bytes / us / 1e3:6.0f} GB/s  ({floor / us:4.0%} of copy bw)", flush=True)

    mask = (torch.arange(C, device=DEV) < length)[None, None, None, :]  # built once, not timed
    row("torch SDPA + mask (eager)", bench_us(lambda i: sdpa(q, ks[i], vs[i], mask, scale), copies, False))
    default = lambda i: decode_attention(q, ks[i], vs[i], lengths, scale, out=out)  # noqa: E731
    row("triton default (eager)", bench_us(default, copies, False))
    row("triton default (CUDA graph)", bench_us(default, copies, True))
    if quick:
        return ok
    res = []
    for cfg in SWEEP:
        try:
            fn = lambda i, cfg=cfg: decode_attention(q, ks[i], vs[i], lengths, scale, out=out, **cfg)  # noqa: E731
            res.append((bench_us(fn, copies, True), cfg))
        except Exception as e:  # e.g. out of shared memory for one tile shape: skip that config
            print(f"  skip {cfg}: {type(e).__name__}: {str(e)[:80]}")
    res.sort(key=lambda r: r[0])
    for us, cfg in res[:3]:
        row(f"graph bn={cfg['block_n']} splits={cfg['splits']} warps={cfg['num_warps']}", us)
    print("  sweep (graph us): " + " ".join(f"{c['block_n']}/{c['splits']}/{c['num_warps']}:{us:.1f}"
                                           for us, c in sorted(res, key=lambda r: tuple(map(str, r[1].values())))))
    return ok


def step_case(H: int, Hkv: int, C: int, length: int, gen: torch.Generator) -> bool:
    """The decode step's attention: separate rope / attention / int8 rounding vs fused, graph us."""
    from ouzel.kernels.triton.fused import rope_qk
    from ouzel.kernels.triton.q8act import quantize_x
    copies = max(2, -(-256 * 2**20 // (2 * C * Hkv * D * 2)))
    ks = [torch.randn(C, Hkv, D, generator=gen).to(DEV, torch.float16) for _ in range(copies)]
    vs = [torch.randn(C, Hkv, D, generator=gen).to(DEV, torch.float16) for _ in range(copies)]
    q = torch.randn(1, H, D, generator=gen).to(DEV)
    nk, nv = torch.randn(1, Hkv, D, generator=gen).to(DEV), torch.randn(1, Hkv, D, generator=gen).to(DEV)
    pos = torch.tensor([length - 1], device=DEV)
    inv = (1.0 / 500000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)).to(DEV)
    norm = (torch.rand(D, generator=gen).to(DEV) + 0.5, torch.rand(D, generator=gen).to(DEV) + 0.5, 1e-6, False)
    scale = D ** -0.5

    def separate(i, warps=None, bn=None):
        qr, kr = rope_qk(q, nk, pos, inv, D, norm)
        out = decode_attention(qr, ks[i], vs[i], pos, scale, new_kv=(kr, nv), num_warps=warps, block_n=bn)
        return out, quantize_x(out.reshape(1, H * D))

    def fused(i, warps=None, bn=None):
        return decode_attention(q, ks[i], vs[i], pos, scale, new_kv=(nk, nv), rope=(inv, D, norm), q8=True,
                                num_warps=warps, block_n=bn)

    a, b = separate(0), fused(0)
    err = rel_err(b[0], a[0])
    ok = err < 1e-5 and torch.equal(a[1][0], b[1][0])
    print(f"{'ok  ' if ok else 'FAIL'} H={H} Hkv={Hkv} C={C} len={length}: fused vs separate rel err {err:.1e}")
    # keys per tile drive the registers with fp32 q (sm_90 ptxas, 4 / 8 warps): 16 -> 107 / 94, 32 -> 202 / 179,
    # 64 -> 255 + spills / 234
    for warps, bn in ((None, None), (4, 64), (8, 64), (4, 32), (8, 32), (4, 16), (8, 16)):
        t_sep = bench_us(lambda i: separate(i, warps, bn), copies, True)
        t_fused = bench_us(lambda i: fused(i, warps, bn), copies, True)
        print(f"  warps {warps or 'default':>7} keys/tile {bn or 'default':>7}: separate {t_sep:7.1f} us   "
              f"fused {t_fused:7.1f} us", flush=True)
    return ok


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="default config only, no sweep")
    ap.add_argument("--step", action="store_true", help="the decode step's attention (fp32 q, f16 cache, fused)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 2
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    bw = copy_bw()
    print(f"copy bandwidth (read + write) {bw / 1e9:.0f} GB/s")
    gen = torch.Generator().manual_seed(0)
    ok = True
    if args.step:
        for H, Hkv in ((32, 8), (32, 4)):
            for C, length in ((1024, 600), (16384, 16000)):
                ok &= step_case(H, Hkv, C, length, gen)
        return 0 if ok else 1
    for C, length in ((4096, 4096), (16384, 16384), (32768, 32768), (32768, 1024)):
        ok &= case(C, length, bw, gen, args.quick)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
