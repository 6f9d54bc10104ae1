"""Check and time the Triton GGUF-block kernels on a CUDA device (run on the lent GPU).

1. correctness: every kernel against the exact torch dequantizer (float64 matmul), fresh random
   valid blocks per check, outputs poisoned with NaN first (NaN never passes);
2. copy bandwidth (read + write) -> bytes floor of each weight;
3. M=1 GEMV per type, shape and config (weights rotated over > 200 MB so L2 can't hold them),
   and M=512: Triton dequantize + cuBLAS fp32 / bf16, against the torch reference path.

    python3 bench/check_triton.py [--quick]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from ouzel.kernels import cuda as ocuda
from ouzel.kernels.triton import gguf as G
from ouzel.kernels.triton.testing import random_blocks, reference_linear, rel_err
from ouzel.quant.blocks import block_type, dequantize

TYPES = ("Q4_K", "Q6_K", "Q8_0", "Q4_0")
LLAMA8B = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))  # [out, in]
FAILS: list[str] = []
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1, --quick --no-time


def check(what: str, err: float, tol: float) -> None:
    ok = err <= tol  # inf/NaN fail
    print(f"{'ok  ' if ok else 'FAIL'} {what}: rel err {err:.2e} (tol {tol:.0e})")
    if not ok:
        FAILS.append(what)


def correctness(gen: torch.Generator, quick: bool) -> None:
    shapes = ((13, 512), (256, 4096), (1000, 14336)) if not quick else ((13, 512), (96, 2048))
    for name in TYPES:
        for n, k in shapes:
            raw = random_blocks(name, n, k, gen, DEV)
            ref_w = dequantize(raw, block_type(name))
            for dt in (torch.float32, torch.bfloat16):
                out = torch.full((n, k), float("nan"), dtype=dt, device=DEV)
                G.qdequant(raw, name, (n, k), dt, out=out)
                err = rel_err(out, ref_w.to(dt))  # 0: the same rounding as torch's
                if err and dt == torch.bfloat16 and ((out.float() - ref_w).abs() <= ref_w.abs() * 2**-7).all():
                    err = 0.0  # within one bf16 rounding (not round-to-nearest-even)
                    print(f"note {name} dequant bf16 differs from torch's rounding")
                check(f"{name} dequant {dt} [{n},{k}]", err, 0.0)
            for m in (1, 2, 7, 16):
                for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
                    if dt == torch.bfloat16 and m not in (1, 16):
                        continue
                    x = torch.randn(m, k, generator=gen).to(DEV, dt)
                    ref = reference_linear(x, raw, name)
                    cfgs = ocuda.GEMV_CONFIGS if (m == 1 and dt == torch.float32) else ocuda.GEMV_CONFIGS[:1]
                    for c in cfgs:
                        out = torch.full((m, n), float("nan"), dtype=dt, device=DEV)
                        G.qgemv(x, raw, name, (n, k), out=out, **c)
                        check(f"{name} gemv {dt} M={m} [{n},{k}] {c}", rel_err(out, ref), tol)
            for m in (17, 100):
                x = torch.randn(m, k, generator=gen, device="cpu").to(DEV)
                ref = reference_linear(x, raw, name)
                check(f"{name} qmatmul fp32 M={m} [{n},{k}]", rel_err(G.qmatmul(x, raw, name, (n, k)), ref), 1e-4)
                check(f"{name} qmatmul bf16 M={m} [{n},{k}]",
                      rel_err(G.qmatmul(x, raw, name, (n, k), torch.bfloat16), ref), 2e-2)


def bench_ms(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def copy_bw() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_(0, 255)
    b = torch.empty_like(a)
    t = bench_ms(lambda: b.copy_(a)) / 1e3
    return 2 * a.numel() / t


def timings(gen: torch.Generator, bw: float, types) -> list[str]:
    rows = []
    for name in types:
        bt = block_type(name)
        for n, k in LLAMA8B:
            nbytes = n * bt.row_bytes(k)
            copies = max(2, -(-256 * 2**20 // nbytes))  # rotate > 256 MB of weights
            raw0 = random_blocks(name, n, k, gen, "cuda")
            raws = [raw0] + [raw0.clone() for _ in range(copies - 1)]  # distinct addresses
            x = torch.randn(1, k, generator=gen).cuda()
            floor_us = nbytes / bw * 1e6
            res = []
            for c in ocuda.GEMV_CONFIGS:
                it = iter(range(1 << 62))
                t = bench_ms(lambda c=c: G.qgemv(x, raws[next(it) % copies], name, (n, k), **c)) * 1e3
                res.append((t, c))
            res.sort(key=lambda r: r[0])
            t, c = res[0]
            all_t = " ".join(f"{r[1]['bn']}/{r[1]['u']}/{r[1].get('num_warps', 4)}:{r[0]:.1f}"
                             for r in sorted(res, key=lambda r: tuple(r[1].values())))
            rows.append(f"M=1   {name:5s} {n:5d}x{k:<5d} {nbytes / 1e6:7.1f} MB  best {t:7.1f} us {c}  "
                        f"{nbytes / t / 1e3:6.0f} GB/s  floor {floor_us:6.1f} us ({floor_us / t:4.0%})  [bn/u/warps:us {all_t}]")
            print("progress:", rows[-1], flush=True)
            if name == "Q4_K":
                it = iter(range(1 << 62))
                tr = bench_ms(lambda: F.linear(x, dequantize(raws[next(it) % copies], bt))) * 1e3
                rows.append(f"M=1   {name:5s} {n:5d}x{k:<5d} torch reference {tr:8.1f} us ({tr / t:.0f}x the kernel)")
                print("progress:", rows[-1], flush=True)
                # M = 512: dequantize (Triton) + cuBLAS, fp32 and bf16
                x5 = torch.randn(512, k, generator=gen).cuda()
                flops = 2 * 512 * n * k
                it = iter(range(1 << 62))
                tdq32 = bench_ms(lambda: G.qdequant(raws[next(it) % copies], name, (n, k), torch.float32)) * 1e3
                tdq16 = bench_ms(lambda: G.qdequant(raws[next(it) % copies], name, (n, k), torch.bfloat16)) * 1e3
                t32 = bench_ms(lambda: G.qmatmul(x5, raws[next(it) % copies], name, (n, k))) * 1e3
                t16 = bench_ms(lambda: G.qmatmul(x5, raws[next(it) % copies], name, (n, k), torch.bfloat16)) * 1e3
                wd = G.qdequant(raws[0], name, (n, k), torch.bfloat16)
                x5b = x5.bfloat16()
                tmm = bench_ms(lambda: torch.matmul(x5b, wd.t())) * 1e3
                tref = bench_ms(lambda: F.linear(x5, dequantize(raws[next(it) % copies], bt))) * 1e3
                rows.append(f"M=512 {name:5s} {n:5d}x{k:<5d} dequant f32 {tdq32:6.1f} us bf16 {tdq16:6.1f} us | "
                            f"qmatmul fp32 {t32:7.1f} us ({flops / t32 / 1e6:5.0f} TF/s)  bf16 {t16:7.1f} us "
                            f"({flops / t16 / 1e6:5.0f} TF/s) | bf16 matmul alone {tmm:6.1f} us | reference {tref:7.1f} us")
                print("progress:", rows[-1], flush=True)
            del raws, raw0
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-time", action="store_true")
    args = ap.parse_args()
    print(torch.cuda.get_device_name() if DEV == "cuda" else "cpu (interpreter)", torch.__version__, flush=True)
    gen = torch.Generator().manual_seed(int(time.time()))
    t0 = time.time()
    correctness(gen, args.quick)
    print(f"correctness: {len(FAILS)} failures ({time.time() - t0:.0f} s)", flush=True)
    rows = []
    if not args.no_time:
        bw = copy_bw()
        print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)", flush=True)
        rows = timings(gen, bw, ("Q4_K", "Q6_K") if args.quick else ("Q4_K", "Q6_K", "Q8_0"))
    print("\n".join(["", "summary:"] + rows + [f"failures: {FAILS or 'none'}"]))
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
