"""Time `v4.attention_chunk` (DeepSeek V4's prefill attention: window + compressed rows, one K=V row
per position shared by all heads) at ds4flash's shapes on the lent GPU (fp32 q, fp16 keys, as the
model passes them), over its tiles: keys per tile, output channels per program, warps. Each
config's output is checked against the default's.

    python3 bench/v4_chunk_bench.py

Cases: a 512-token chunk at depth 0 in an HCA layer (ratio 128: 4 complete rows) and a CSA layer
(ratio 4: 128 rows, all kept), and at depth 4096 in a CSA layer with the indexer's 512 picks.
"""
from __future__ import annotations

import itertools

import torch
from triton.testing import do_bench_cudagraph

from ouzel.kernels.triton import v4
from ouzel.kernels.triton.testing import rel_err

T, H, D, WINDOW, TOP_K = 512, 64, 512, 128, 512
SWEEP = [dict(block_n=bn, block_out=bo, num_warps=w) for bn, bo, w in itertools.product((16, 32), (256, 512), (4, 8))]


def case(ratio: int, depth: int, picks: bool, g):
    positions = torch.arange(depth, depth + T)
    kept = min(depth, WINDOW)
    keys = torch.randn(kept + T, D, generator=g).to("cuda", torch.float16)
    n = (depth + T) // ratio
    rows = torch.randn(n, D, generator=g).to("cuda", torch.float16)
    q = (torch.randn(T, H, D, generator=g) * 0.5).cuda()
    sinks = torch.randn(H, generator=g).cuda()
    top = None
    if picks:  # each query's TOP_K of its ready rows, -1 where it has fewer
        ready = (positions + 1) // ratio
        top = torch.stack([torch.cat([torch.randperm(int(r), generator=g)[:TOP_K],
                                      torch.full((TOP_K,), -1)])[:TOP_K] for r in ready]).cuda()
    return q, keys, positions.cuda(), WINDOW, sinks, D ** -0.5, rows, ratio, top


def main() -> None:
    g = torch.Generator().manual_seed(0)
    for name, ratio, depth, picks in (("HCA at 0", 128, 0, False), ("CSA at 0", 4, 0, False),
                                      ("CSA picks at 4096", 4, 4096, True)):
        args = case(ratio, depth, picks, g)
        want = v4.attention_chunk(*args)
        base = do_bench_cudagraph(lambda: v4.attention_chunk(*args), rep=20)
        print(f"{name}: default {base * 1e3:.0f} us", flush=True)
        results = []
        for cfg in SWEEP:
            try:
                got = v4.attention_chunk(*args, **cfg)
                t = do_bench_cudagraph(lambda cfg=cfg: v4.attention_chunk(*args, **cfg), rep=20)
            except Exception as e:  # out of resources (shared memory), a compile failure
                print(f"  {cfg}: {type(e).__name__} {str(e)[:80]}", flush=True)
                continue
            results.append((t, cfg, rel_err(got, want)))
        for t, cfg, err in sorted(results, key=lambda r: r[0]):
            print(f"  {t * 1e3:7.0f} us  {cfg}  rel err {err:.1e}{'' if err < 1e-4 else '  WRONG'}", flush=True)


if __name__ == "__main__":
    main()
