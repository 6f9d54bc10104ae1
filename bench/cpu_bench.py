"""CPU speed: ouzel vs llama.cpp (llama-cpp-python) on the real GGUFs, in the same run.

    python bench/cpu_bench.py [--models smollm2-135m gemma3-270m] [--runs 3] [--threads 2]

Each engine runs in its own subprocess (so peak RSS is its own): prefill of a 512-token prompt,
then greedy decode of 128 tokens with EOS ignored; median over runs. llama.cpp needs
llama-cpp-python installed (a CPU build from its sdist takes ~25 minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

TEXT = ("The river bird dives under the cold water, walks along the stony bed against the current, "
        "and comes up with a larva in its beak. ") * 40


def worker_ouzel(model: str, n_prompt: int, n_gen: int, runs: int, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    import ouzel
    from ouzel.engine.generate import Sequence
    llm = ouzel.load(model)
    ids = llm.tokenize(TEXT)[:n_prompt]
    pp, tg = [], []
    for _ in range(runs + 1):  # the first run warms up
        seq = Sequence(llm.model, n_prompt + n_gen + 8, llm.device)
        t = time.perf_counter()
        logits = seq.prefill(ids)
        pp.append(n_prompt / (time.perf_counter() - t))
        tok = int(logits.argmax())
        t = time.perf_counter()
        for _ in range(n_gen):
            tok = int(seq.step(tok).argmax())
        tg.append(n_gen / (time.perf_counter() - t))
    return {"pp": statistics.median(pp[1:]), "tg": statistics.median(tg[1:])}


def worker_llamacpp(model: str, n_prompt: int, n_gen: int, runs: int, threads: int) -> dict:
    import llama_cpp
    from ouzel.hub import resolve
    llm = llama_cpp.Llama(str(resolve(model)), n_ctx=n_prompt + n_gen + 8, n_threads=threads,
                          n_threads_batch=threads, n_batch=512, verbose=False)
    ids = llm.tokenize(TEXT.encode())[:n_prompt]
    import numpy as np
    n_vocab = llm.n_vocab()

    def last_logits():  # the newest token's logits (llama-cpp-python keeps them only with logits_all)
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
    pp, tg = [], []
    for _ in range(runs + 1):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        pp.append(n_prompt / (time.perf_counter() - t))
        t = time.perf_counter()
        for _ in range(n_gen):
            tok = int(last_logits().argmax())
            llm.eval([tok])
        tg.append(n_gen / (time.perf_counter() - t))
    return {"pp": statistics.median(pp[1:]), "tg": statistics.median(tg[1:])}


def run_worker(engine: str, model: str, args) -> dict:
    code = (f"import json, resource, sys; sys.path.insert(0, 'bench'); import cpu_bench as b; "
            f"r = b.worker_{engine}({model!r}, {args.prompt}, {args.gen}, {args.runs}, {args.threads}); "
            f"r['rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024; print(json.dumps(r))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if p.returncode != 0:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "failed"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--engines", nargs="+", default=["llamacpp", "ouzel"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    args = ap.parse_args()
    print(f"prefill {args.prompt} tokens, greedy decode {args.gen}, {args.threads} threads, median of {args.runs}")
    print(f"{'model':<14}{'engine':<10}{'prefill tok/s':>14}{'decode tok/s':>14}{'peak RSS MB':>13}")
    for model in args.models:
        res = {e: run_worker(e, model, args) for e in args.engines}
        for e, r in res.items():
            if "error" in r:
                print(f"{model:<14}{e:<10}  error: {r['error']}")
            else:
                print(f"{model:<14}{e:<10}{r['pp']:>14.1f}{r['tg']:>14.1f}{r['rss_mb']:>13.0f}")
        if all("error" not in r for r in res.values()) and {"ouzel", "llamacpp"} <= set(res):
            o, l = res["ouzel"], res["llamacpp"]
            print(f"{model:<14}{'ratio':<10}{o['pp'] / l['pp']:>13.2f}x{o['tg'] / l['tg']:>13.2f}x")


if __name__ == "__main__":
    main()
