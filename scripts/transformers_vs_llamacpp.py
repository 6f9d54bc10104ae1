#!/usr/bin/env python3
"""Measure how close Hugging Face transformers gets to llama.cpp on the fixtures.

Run from the repository root, after ``scripts/make_reference.py``:

    python scripts/transformers_vs_llamacpp.py
    python scripts/transformers_vs_llamacpp.py --models smollm2-135m

Needs transformers (5.23 was used), accelerate (transformers refuses to load a
GGUF without it), torch, numpy, gguf and the two model packages.  transformers
loads the same GGUF file via
``AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=float32)``,
which dequantizes every tensor to float32; the model then runs in float32 on
CPU.  Token ids always come from the llama.cpp fixtures (the transformers
tokenizer is not used).

Per prompt of ``tests/fixtures/llamacpp_<model>.json``:

* ``logits_max_abs`` / ``logits_rel_l2``: last-prompt-position logits vs the
  llama.cpp row in ``llamacpp_<model>_logits.npz`` (only the prompts that have
  one); rel L2 = ||hf - ref|| / ||ref||.
* ``top10_lp_max_abs``: teacher forcing with prompt + llama.cpp's greedy
  tokens, max |hf_logprob - ref_logprob| over the 32 steps x llama.cpp's top-10
  ids (log_softmax in float64).
* ``greedy_match``: number of the 32 greedy tokens that agree before the first
  divergence (transformers argmax along the teacher-forced path == its own
  free-running greedy up to the first divergence).  ``ref_top2_gap_at_div`` is
  llama.cpp's log-prob gap between its top-2 tokens at that step.

Writes ``tests/fixtures/transformers_closeness.json`` with per-prompt numbers
and per-model worst cases (models not run this time are kept from the old file).

Optional diagnostics (stored under ``models.<key>.diagnostics``):

* ``--self-check``: llama.cpp on the same GGUF fed prompt + greedy tokens in
  ONE eval call vs the fixture (prompt, then one token per call): llama.cpp's
  own noise floor from different CPU kernel paths.
* ``--f32-check``: llama.cpp on an all-F32 dequantized copy of the GGUF (temp
  file, ~4 bytes/param) vs transformers: shows how much of the gap comes from
  llama.cpp quantizing activations (Q8 blocks) inside its quantized matmuls.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
import traceback

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))
from make_reference import FIXTURES, MODEL_PATHS, N_CTX, N_THREADS, log_softmax64  # noqa: E402

OUT_NAME = "transformers_closeness.json"


def load_hf(path: str, attn: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path),
        dtype=torch.float32, attn_implementation=attn)
    model.eval()
    return model


def hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    return out.logits[0].float().numpy()


def compare_model(key: str, attn: str, self_check: bool = False, f32_check: bool = False) -> dict:
    with open(os.path.join(FIXTURES, f"llamacpp_{key}.json"), encoding="utf-8") as f:
        ref = json.load(f)
    npz = np.load(os.path.join(FIXTURES, ref["logits_file"]))
    path = MODEL_PATHS[key]()
    result = {"model_key": key, "model_file": os.path.basename(path),
              "fixture_logits_dtype": ref["logits_dtype"]}
    t0 = time.time()
    try:
        model = load_hf(path, attn)
    except Exception as e:  # record and go on
        result.update({"loaded": False, "error": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc(limit=5)})
        print(f"[{key}] transformers failed to load: {type(e).__name__}: {e}")
        return result
    result.update({"loaded": True, "hf_class": type(model).__name__,
                   "load_seconds": round(time.time() - t0, 1)})

    n_greedy = ref["n_greedy"]
    rows = []
    hf_steps = {}
    for p in ref["prompts"]:
        n = len(p["prompt_ids"])
        ids = p["prompt_ids"] + p["greedy_ids"][:-1]
        logits = hf_logits(model, ids)                     # [n + 31, V] float32
        steps = logits[n - 1: n - 1 + n_greedy].copy()     # positions of the 32 steps
        del logits
        if f32_check:
            hf_steps[p["name"]] = steps
        lp = log_softmax64(steps)
        ref_ids = np.array(p["top_ids"])                   # [32, 10]
        ref_lp = np.array(p["top_logprobs"])               # [32, 10]
        hf_lp = np.take_along_axis(lp, ref_ids, axis=1)
        top10_diff = np.abs(hf_lp - ref_lp)

        hf_argmax = steps.argmax(axis=1)
        agree = hf_argmax == np.array(p["greedy_ids"])
        div = int(np.argmin(agree)) if not agree.all() else None
        row = {
            "name": p["name"],
            "n_prompt_tokens": n,
            "top10_lp_max_abs": float(top10_diff.max()),
            "top1_lp_max_abs": float(top10_diff[:, 0].max()),
            "greedy_match": n_greedy if div is None else div,
            "greedy_match_all": div is None,
            "teacher_forced_top1_agree": int(agree.sum()),
            "ref_top2_gap_at_div": None if div is None else p["top2_gap"][div],
            "hf_token_at_div": None if div is None else int(hf_argmax[div]),
            "ref_token_at_div": None if div is None else p["greedy_ids"][div],
            "logits_max_abs": None,
            "logits_rel_l2": None,
        }
        if p.get("logits_key"):
            r = npz[p["logits_key"]].astype(np.float64)
            h = steps[0].astype(np.float64)
            row["logits_max_abs"] = float(np.abs(h - r).max())
            row["logits_rel_l2"] = float(np.linalg.norm(h - r) / np.linalg.norm(r))
        rows.append(row)
        print(f"[{key}] {p['name']:<15} done")

    def worst(field, fn=max):
        vals = [r[field] for r in rows if r[field] is not None]
        return fn(vals) if vals else None

    divs = [r for r in rows if r["ref_top2_gap_at_div"] is not None]
    result["prompts"] = rows
    result["worst"] = {
        "logits_max_abs": worst("logits_max_abs"),
        "logits_rel_l2": worst("logits_rel_l2"),
        "top10_lp_max_abs": worst("top10_lp_max_abs"),
        "top1_lp_max_abs": worst("top1_lp_max_abs"),
        "greedy_match_min": worst("greedy_match", min),
        "teacher_forced_top1_agree_min": worst("teacher_forced_top1_agree", min),
        "n_prompts": len(rows),
        "n_prompts_full_greedy_match": sum(r["greedy_match_all"] for r in rows),
        # largest llama.cpp top-2 gap at which transformers still diverged
        "max_ref_top2_gap_at_div": max((r["ref_top2_gap_at_div"] for r in divs), default=None),
    }
    del model
    diag = {}
    if self_check:
        diag["llamacpp_batched_vs_incremental"] = llamacpp_check(ref, npz, path)
    if f32_check:
        diag["llamacpp_f32_weights_vs_transformers"] = f32_weights_check(ref, path, hf_steps)
    if diag:
        result["diagnostics"] = diag
    return result


def _llamacpp_steps(llm, p, n_greedy):
    """Teacher-forced logits of the 32 steps, prompt + greedy[:-1] in ONE eval call."""
    n = len(p["prompt_ids"])
    llm.reset()
    llm.eval(p["prompt_ids"] + p["greedy_ids"][:-1])
    return np.array(llm.scores[n - 1: n - 1 + n_greedy], dtype=np.float32)


def llamacpp_check(ref, npz, path):
    """llama.cpp (same quantized GGUF) fed prompt+greedy in one batch vs the
    fixture (prompt batch, then one token per eval): llama.cpp's own noise floor
    from taking different CPU kernel paths."""
    from llama_cpp import Llama
    llm = Llama(path, n_ctx=N_CTX, n_threads=N_THREADS, n_threads_batch=N_THREADS,
                logits_all=True, seed=0, verbose=False)
    out = []
    for p in ref["prompts"]:
        steps = _llamacpp_steps(llm, p, ref["n_greedy"])
        lp = log_softmax64(steps)
        d = np.abs(np.take_along_axis(lp, np.array(p["top_ids"]), 1) - np.array(p["top_logprobs"]))
        agree = lp.argmax(1) == np.array(p["greedy_ids"])
        row = {"name": p["name"], "top10_lp_max_abs": float(d.max()),
               "greedy_match": int(np.argmin(agree)) if not agree.all() else len(agree),
               "teacher_forced_top1_agree": int(agree.sum()), "logits_max_abs": None}
        row["ref_top2_gap_at_div"] = (None if row["greedy_match"] == len(agree)
                                      else p["top2_gap"][row["greedy_match"]])
        if p.get("logits_key"):
            row["logits_max_abs"] = float(np.abs(steps[0].astype(np.float64)
                                                 - npz[p["logits_key"]].astype(np.float64)).max())
        out.append(row)
        print(f"  self-check {p['name']:<15} top10 maxabs={row['top10_lp_max_abs']:.4f} "
              f"greedy {row['greedy_match']}/32")
    llm.close()
    return {"description": "llama.cpp same GGUF, prompt+greedy[:-1] in one eval call, "
                           "vs the fixture (prompt batch then 1 token per eval)",
            "prompts": out,
            "worst": {"top10_lp_max_abs": max(r["top10_lp_max_abs"] for r in out),
                      "logits_max_abs": max((r["logits_max_abs"] for r in out
                                             if r["logits_max_abs"] is not None), default=None),
                      "greedy_match_min": min(r["greedy_match"] for r in out),
                      "max_ref_top2_gap_at_div": max((r["ref_top2_gap_at_div"] for r in out
                                                      if r["ref_top2_gap_at_div"] is not None),
                                                     default=None)}}


def write_f32_gguf(src: str, dst: str) -> None:
    """Copy a GGUF with every tensor dequantized to F32 (diagnostic only)."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize
    r = GGUFReader(src)
    w = GGUFWriter(dst, r.fields["general.architecture"].contents())
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        vt = f.types[0]
        st = f.types[-1] if vt == GGUFValueType.ARRAY else None
        v = 0 if f.name == "general.file_type" else f.contents()  # 0 = ALL_F32
        w.add_key_value(f.name, v, vt, sub_type=st)
    for t in r.tensors:
        w.add_tensor(t.name, np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def f32_weights_check(ref, path, hf_steps):
    """llama.cpp on an all-F32 copy of the GGUF (same dequantized weights that
    transformers uses) vs transformers: isolates llama.cpp's quantized-activation
    dot products (the Q8 activation blocks of its quantized matmuls)."""
    import tempfile
    from llama_cpp import Llama
    out = []
    with tempfile.TemporaryDirectory() as td:
        f32 = os.path.join(td, "f32.gguf")
        write_f32_gguf(path, f32)
        llm = Llama(f32, n_ctx=N_CTX, n_threads=N_THREADS, n_threads_batch=N_THREADS,
                    logits_all=True, seed=0, verbose=False)
        for p in ref["prompts"]:
            steps = _llamacpp_steps(llm, p, ref["n_greedy"]).astype(np.float64)
            h = hf_steps[p["name"]].astype(np.float64)
            ids = np.array(p["top_ids"])
            lp_c, lp_h = log_softmax64(steps), log_softmax64(h)
            row = {"name": p["name"],
                   "logits_max_abs": float(np.abs(steps - h).max()),
                   "logits_rel_l2": float(np.linalg.norm(steps - h) / np.linalg.norm(steps)),
                   "top10_lp_max_abs": float(np.abs(np.take_along_axis(lp_c, ids, 1)
                                                    - np.take_along_axis(lp_h, ids, 1)).max()),
                   "top10_lp_max_abs_vs_fixture": float(np.abs(np.take_along_axis(lp_c, ids, 1)
                                                               - np.array(p["top_logprobs"])).max())}
            out.append(row)
            print(f"  f32-check {p['name']:<15} vs hf logits maxabs={row['logits_max_abs']:.4f} "
                  f"vs fixture top10={row['top10_lp_max_abs_vs_fixture']:.4f}")
        llm.close()
    return {"description": "llama.cpp on an all-F32 dequantized copy of the GGUF, "
                           "prompt+greedy[:-1] in one eval; compared over the 32 step "
                           "positions with transformers and with the fixture",
            "prompts": out,
            "worst": {k: max(r[k] for r in out) for k in
                      ("logits_max_abs", "logits_rel_l2", "top10_lp_max_abs",
                       "top10_lp_max_abs_vs_fixture")}}


def print_table(results: list[dict]) -> None:
    hdr = (f"{'model':<13} {'prompt':<15} {'n':>4} {'logit maxabs':>12} {'logit relL2':>11} "
           f"{'top10 lp maxabs':>15} {'greedy':>7} {'gap@div':>8}")
    print()
    print(hdr)
    print("-" * len(hdr))
    fmt = lambda v, s: ("-" if v is None else format(v, s))  # noqa: E731
    for res in results:
        if not res.get("loaded"):
            print(f"{res['model_key']:<13} LOAD FAILED: {res['error']}")
            continue
        for r in res["prompts"]:
            print(f"{res['model_key']:<13} {r['name']:<15} {r['n_prompt_tokens']:>4} "
                  f"{fmt(r['logits_max_abs'], '.4f'):>12} {fmt(r['logits_rel_l2'], '.2e'):>11} "
                  f"{r['top10_lp_max_abs']:>15.4f} {r['greedy_match']:>4d}/32 "
                  f"{fmt(r['ref_top2_gap_at_div'], '.4f'):>8}")
        w = res["worst"]
        print(f"{res['model_key']:<13} {'WORST':<15} {'':>4} {fmt(w['logits_max_abs'], '.4f'):>12} "
              f"{fmt(w['logits_rel_l2'], '.2e'):>11} {w['top10_lp_max_abs']:>15.4f} "
              f"{w['greedy_match_min']:>4d}/32 {fmt(w['max_ref_top2_gap_at_div'], '.4f'):>8}")
        print("-" * len(hdr))
        for name, d in res.get("diagnostics", {}).items():
            print(f"{res['model_key']:<13} diagnostic {name}: worst "
                  + ", ".join(f"{k}={v:.4g}" for k, v in d["worst"].items() if v is not None))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=list(MODEL_PATHS), choices=list(MODEL_PATHS))
    ap.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--self-check", action="store_true",
                    help="also run llama.cpp batched vs incremental (its own noise floor)")
    ap.add_argument("--f32-check", action="store_true",
                    help="also run llama.cpp on an F32-dequantized copy of the GGUF vs transformers")
    ap.add_argument("--out", default=os.path.join(FIXTURES, OUT_NAME))
    args = ap.parse_args(argv)

    import torch
    import transformers
    torch.set_num_threads(args.threads)

    results = [compare_model(k, args.attn, args.self_check, args.f32_check) for k in args.models]
    print_table(results)

    obj = {
        "schema_version": 1,
        "description": ("transformers (GGUF dequantized to float32, CPU) vs llama.cpp "
                        "fixtures; 'worst' is the per-model worst case over prompts"),
        "metadata": {
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "numpy_version": np.__version__,
            "attn_implementation": args.attn,
            "dtype": "float32",
            "torch_threads": args.threads,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(),
        },
        "models": {},
    }
    if os.path.exists(args.out):  # keep results of models not re-run this time
        try:
            with open(args.out, encoding="utf-8") as f:
                obj["models"].update(json.load(f).get("models", {}))
        except (OSError, ValueError):
            pass
    obj["models"].update({r["model_key"]: r for r in results})
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {os.path.relpath(args.out, REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
