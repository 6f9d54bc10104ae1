"""Time the MoE prefill GEMM (`gguf.qgemm_experts`) on the lent GPU: a prefill's (token, expert)
pairs with random top-k routing, for the fused gate/up stack and the down stack of the two MoE
bench models at their real block types, over a few tile configs. Each config is checked against
the torch dequantizer (relative error, NaN fails) and timed with do_bench (median).

    python3 bench/moe_gemm_bench.py                  # 512 tokens, every shape, ~1-2 minutes
    python3 bench/moe_gemm_bench.py --tokens 2048 --shapes ds4-gate_up --configs 16,64,4,1,1,0

Prints us per call, effective GB/s of weight bytes (every expert's blocks once; experts no token
chose are skipped by the kernel but counted, as a prefill touches nearly all), TFLOP/s of the real
pairs, and the best config per shape in `cuda.MOE_GEMM_CONFIGS` form.
"""
from __future__ import annotations

import argparse
import time

import torch
from triton.testing import do_bench

from ouzel.kernels.triton import gguf as G
from ouzel.quant.blocks import block_type, dequantize

# name: (block type, n, k, experts, experts per token); gate/up are the fused [gate; up] stack
SHAPES = {
    # DeepSeek-V4-Flash: hidden 4096, expert ffn 2048; its experts as the loader regroups them on CUDA
    "ds4-gate_up": ("IQ2_XXS_R8", 4096, 4096, 256, 6),
    "ds4-down": ("Q2_K_R8", 4096, 2048, 256, 6),
    "qwen3-gate_up": ("Q4_K", 1536, 2048, 128, 8),  # Qwen3-30B-A3B: hidden 2048, expert ffn 768
    "qwen3-down-q6k": ("Q6_K", 2048, 768, 128, 8),  # Q4_K_M gives ffn_down Q6_K in ~half the layers
    "qwen3-down-q4k": ("Q4_K", 2048, 768, 128, 8),
}
# (bm, bn, num_warps, stages, quads): the first is the old kernel's tile (per-element decode, BM 64)
CONFIGS = [(64, 64, 4, 1, 0), (16, 64, 4, 1, 0), (16, 64, 4, 1, 1), (16, 64, 8, 1, 1), (16, 128, 8, 1, 1),
           (16, 64, 4, 2, 1), (32, 64, 4, 1, 1), (32, 128, 8, 1, 1), (64, 128, 8, 1, 1)]
_F16_FIELDS = {"Q4_K": (0, 2), "Q6_K": (208,), "Q8_0": (0,), "Q4_0": (0,), "Q2_K": (80, 82), "IQ2_XXS": (0,)}


def random_stack(name: str, rows: int, k: int, seed: int) -> torch.Tensor:
    """uint8 [rows, row_bytes] of random blocks made on the GPU (a CPU generator takes minutes at
    1 GB), their float16 scales small and positive as in `testing.random_blocks`; `*_R8` names are
    made in GGUF's layout and regrouped as the loader does."""
    if name.endswith("_R8"):
        from ouzel.quant import blocks
        return getattr(blocks, f"repack_{name.lower()}")(random_stack(name[:-3], rows, k, seed))
    bt = block_type(name)
    nb = k // bt.block_elems
    g = torch.Generator(device="cuda").manual_seed(seed)
    raw = torch.randint(0, 256, (rows, nb, bt.block_bytes), dtype=torch.uint8, device="cuda", generator=g)
    for off in _F16_FIELDS[name]:
        d = (torch.rand((rows, nb), device="cuda", generator=g) * 0.02 + 0.001).to(torch.float16)
        raw[:, :, off:off + 2] = d.view(torch.uint8).view(rows, nb, 2)
    return raw.reshape(rows, nb * bt.block_bytes)


def routing(tokens: int, experts: int, top_k: int, seed: int):
    """Random top-k choice per token (distinct experts), pairs sorted by expert: (pair_rows, counts)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    idx = torch.rand((tokens, experts), device="cuda", generator=g).topk(top_k, dim=-1).indices
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    return (order // top_k).to(torch.int32), torch.bincount(flat, minlength=experts).tolist()


def reference(x, raw, name, n, pair_rows, counts) -> torch.Tensor:
    """float32 out [P, n] through the torch dequantizer, one expert at a time."""
    out = torch.empty((len(pair_rows), n), device="cuda")
    at = 0
    for e, c in enumerate(counts):
        if c:
            w = dequantize(raw[e * n:(e + 1) * n], block_type(name))
            out[at:at + c] = x[pair_rows[at:at + c].long()].float() @ w.t()
        at += c
    return out


def rel_err(out, ref) -> float:
    out = out.float()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


def run_shape(label, tokens, configs, tol, swiglu=False):
    name, n, k, E, K = SHAPES[label]
    raw = random_stack(name, E * n, k, seed=1)
    P = tokens * K
    # gate/up read each pair's token row, down each pair's own row (the swiglu output)
    gate_up = label.endswith("gate_up")
    x = torch.randn((tokens if gate_up else P, k), device="cuda", dtype=torch.bfloat16)
    pair_rows, counts = routing(tokens, E, K, seed=2)
    if not gate_up:
        pair_rows = torch.arange(P, dtype=torch.int32, device="cuda")
    ref = reference(x, raw, name, n, pair_rows, counts)
    swiglu = swiglu and gate_up
    if swiglu:  # silu(gate) * up formed by the GEMM (V4's clamp at 10)
        from ouzel.layers.moe import swiglu as act
        ref = act(ref[:, :n // 2], ref[:, n // 2:], 10.0)
    gbytes = raw.numel() / 1e9
    flops = 2.0 * P * n * k
    print(f"\n{label}: {name} [{E} x {n} x {k}], {tokens} tokens x top-{K} = {P} pairs, "
          f"{sum(c > 0 for c in counts)} experts used, rows/expert mean {P / E:.1f} max {max(counts)}, "
          f"{gbytes:.2f} GB of blocks")
    print(f"{'bm':>4} {'bn':>4} {'warps':>5} {'stages':>6} {'quads':>9} {'us':>9} {'GB/s':>7} "
          f"{'TFLOP/s':>8} {'rel err':>9}")
    best = None
    for bm, bn, warps, stages, quads, *more in configs:
        halves, prmt = (*more, *(1, 0)[len(more):])[:2]
        tag = f"{quads}/{halves}" + ("/prmt" if prmt else "")  # quads/halves[/prmt]
        tiles = G.moe_tiles(counts, bm, "cuda")
        out = torch.empty((P, n // 2 if swiglu else n), device="cuda", dtype=torch.bfloat16)
        fn = lambda: G.qgemm_experts(x, raw, name, (n, k), pair_rows, tiles, out=out, bm=bm, bn=bn,  # noqa: E731
                                     num_warps=warps, stages=stages, quads=bool(quads),
                                     halves=halves, prmt=bool(prmt), swiglu=swiglu, limit=10.0 if swiglu else None)
        try:
            out.fill_(float("nan"))
            fn()
            err = rel_err(out, ref)
            us = do_bench(fn, warmup=10, rep=60, return_mode="median") * 1e3
        except Exception as ex:  # noqa: BLE001 (a config that does not compile, e.g. out of shared memory)
            print(f"{bm:>4} {bn:>4} {warps:>5} {stages:>6} {tag:>9}  failed: {type(ex).__name__}: "
                  f"{str(ex)[:80]}")
            continue
        ok = err < tol
        print(f"{bm:>4} {bn:>4} {warps:>5} {stages:>6} {tag:>9} {us:>9.1f} {gbytes / us * 1e6:>7.0f} "
              f"{flops / us / 1e6:>8.1f} {err:>9.2e}{'' if ok else '  FAIL'}")
        if ok and (best is None or us < best[0]):
            best = (us, dict(bm=bm, bn=bn, num_warps=warps, stages=stages, quads=bool(quads), halves=halves,
                             **({"prmt": True} if prmt else {})))
    del raw
    torch.cuda.empty_cache()
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names of SHAPES")
    ap.add_argument("--configs", nargs="*", help="bm,bn,warps,stages,quads[,halves[,prmt]] (default: CONFIGS)")
    ap.add_argument("--tol", type=float, default=2e-2, help="max relative error (bf16 operands)")
    ap.add_argument("--swiglu", action="store_true", help="gate/up shapes: silu(gate) * up formed by the GEMM")
    args = ap.parse_args()
    configs = [tuple(int(v) for v in c.split(",")) for c in args.configs] if args.configs else CONFIGS
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    t0 = time.time()
    best = {label: run_shape(label, args.tokens, configs, args.tol, args.swiglu) for label in args.shapes.split(",")}
    print(f"\nbest per shape ({args.tokens} tokens; {time.time() - t0:.0f} s):")
    for label, b in best.items():
        name, n, k, E, K = SHAPES[label]
        print(f"    ({name!r}, {n}, {k}): {b[1] if b else None},  # {label}: {b[0] if b else float('nan'):.0f} us")


if __name__ == "__main__":
    main()
