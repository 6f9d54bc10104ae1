"""Time the Triton causal prefill kernel against torch SDPA (flash) on a cached chunk (CUDA only).

One chunk of T = 512 queries at depth 0, 4096 and 16384: Llama-3-8B heads (H=32, Hkv=8) and
Qwen3-30B-A3B's (H=32, Hkv=4), D=128, fp16 cache, fp32 q (what the models pass). SDPA gets the
visible keys sliced on the host (what the eager prefill did: `causal_lower_right` at depth); the
Triton kernel reads the key range from the positions on the device. Prints us per call, TFLOP/s
of the causal work, the error against the oracle, and a sweep of tiles / warps / stages.

    python3 bench/bench_prefill_attention.py
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from triton.testing import do_bench

from ouzel.kernels.triton.attention import prefill_attention, prefill_attention_reference
from ouzel.kernels.triton.testing import rel_err

T, D = 512, 128
SWEEP = [dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st) for bm, bn, w, st in
         itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3)) if bm * bn <= 8192]


def sdpa(q, k, v, start, G):
    S = start + q.shape[0]
    kk, vv = k[:S].transpose(0, 1)[None], v[:S].transpose(0, 1)[None]
    mask = causal_lower_right(q.shape[0], S) if start else None
    out = F.scaled_dot_product_attention(q.to(k.dtype).transpose(0, 1)[None], kk, vv, attn_mask=mask,
                                         is_causal=not start, scale=D ** -0.5, enable_gqa=G > 1)
    return out[0].transpose(0, 1).float()


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for H, Hkv in ((32, 8), (32, 4)):
        for start in (0, 4096, 16384):
            C = start + T
            q = torch.randn(T, H, D, device="cuda", generator=gen)
            k = torch.randn(C, Hkv, D, device="cuda", generator=gen).half()
            v = torch.randn(C, Hkv, D, device="cuda", generator=gen).half()
            pos = torch.arange(start, C, device="cuda")
            flops = 4 * H * D * T * (start + (T + 1) / 2)
            ref = prefill_attention_reference(q[-64:], k, v, pos[-64:], D ** -0.5)
            t_sdpa = do_bench(lambda: sdpa(q, k, v, start, H // Hkv), rep=50) * 1e3
            res = []
            for c in SWEEP:
                try:
                    out = prefill_attention(q, k, v, pos, D ** -0.5, **c)
                    err = rel_err(out[-64:], ref)
                    res.append((do_bench(lambda c=c: prefill_attention(q, k, v, pos, D ** -0.5, **c), rep=50) * 1e3,
                                err, c))
                except Exception as e:  # a config that does not fit shared memory
                    print(f"  {c}: {type(e).__name__}", flush=True)
            res.sort(key=lambda r: r[0])
            t_def = do_bench(lambda: prefill_attention(q, k, v, pos, D ** -0.5), rep=50) * 1e3
            best = res[0]
            print(f"H={H} Hkv={Hkv} depth {start:6d}: sdpa {t_sdpa:7.1f} us ({flops / t_sdpa / 1e6:5.0f} TFLOP/s) | "
                  f"triton default {t_def:7.1f} us | best {best[0]:7.1f} us ({flops / best[0] / 1e6:5.0f} TFLOP/s) "
                  f"err {best[1]:.1e} {best[2]} | next " + " ".join(f"{r[0]:.0f}" for r in res[1:4]), flush=True)


if __name__ == "__main__":
    main()
