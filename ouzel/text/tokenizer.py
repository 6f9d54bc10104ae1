"""Tokenizers that give llama.cpp's token ids, built on Hugging Face `tokenizers`.

Two sources:

* GGUF metadata (`Tokenizer.from_gguf`): the vocabulary, scores, token types and merges stored in
  the file. `tokenizer.ggml.model == "gpt2"` is byte-level BPE with a pre-tokenizer regex chosen by
  `tokenizer.ggml.pre`; `"llama"` is llama.cpp's SentencePiece-style tokenizer (merge the adjacent
  pair whose result has the highest score, fall back to `<0xXX>` byte tokens). The aim is the exact
  ids of `llama_tokenize`, so the parts around the BPE model follow llama.cpp, not Hugging Face:
  special tokens are split off the text longest first (`tokenizer_st_partition`), user-defined
  tokens are split off even when special parsing is off, token attributes are adjusted the way
  llama.cpp adjusts them at load time (end-of-generation detection by token text), and decoding is
  the concatenation of llama.cpp's `token_to_piece`.
* A Hugging Face model directory (`Tokenizer.from_hf_dir`): tokenizer.json as it is.
"""
from __future__ import annotations

import codecs
import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..errors import OuzelError, UnsupportedError

log = logging.getLogger(__name__)

# llama.cpp's token attributes (llama_token_attr), bit flags
ATTR_UNDEFINED = 0
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
ATTR_NORMALIZED = 1 << 6
ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8
ATTR_SINGLE_WORD = 1 << 9

# GGUF tokenizer.ggml.token_type values -> attribute
_TYPE_TO_ATTR = {0: ATTR_UNDEFINED, 1: ATTR_NORMAL, 2: ATTR_UNKNOWN, 3: ATTR_CONTROL,
                 4: ATTR_USER_DEFINED, 5: ATTR_UNUSED, 6: ATTR_BYTE}

# tokens that llama.cpp's special-token partition splits off the text
_PARTITION_ATTRS = ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN
# tokens whose piece is empty unless special tokens are rendered
_SPECIAL_ATTRS = ATTR_CONTROL | ATTR_UNKNOWN

# Token texts llama.cpp uses to find special tokens that the metadata does not name.
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<end_of_utterance>")
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_TEXTS = {
    "pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<MID>", "<|code_middle|>", "<|middle|>"),
    "pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "sep": ("<|file_sep|>",),
}
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>",
              "<|calls|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>",
              "[EOT]", "[EOS]", "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>",
              "<|tool_response>")
_ALWAYS_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")  # gpt-oss

# ---------------------------------------------------------------------------------------------
# byte-level BPE pre-tokenizer regexes, as llama.cpp applies them (each splits the pieces of the
# previous one; matches and the text between matches both become pieces)

_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3_RE = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35_RE = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SEED_CODER_RE = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_BAILING_RE = (r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+")
_UPPER = r"((?=[\p{L}])([^a-z]))"
_LOWER = r"((?=[\p{L}])([^A-Z]))"
_TEKKEN_RE = (r"[^\r\n\p{L}\p{N}]?" + _UPPER + "*" + _LOWER + r"+|[^\r\n\p{L}\p{N}]?" + _UPPER + "+"
              + _LOWER + r"*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_RE = (r"[^\r\n\p{L}\p{N}]?" + _UPPER + "*" + _LOWER + "+" + _CONTRACTIONS + r"?|[^\r\n\p{L}\p{N}]?"
             + _UPPER + "+" + _LOWER + "*" + _CONTRACTIONS + r"?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK3_RE = (r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                 r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_BLOOM_RE = r" ?[^(\s|.,!?…。，、।۔،)]+"

_PRE_DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", _GPT2_RE, r"\p{N}+", r"[0-9][0-9][0-9]"]

# Letters and digits added in Unicode 16.0. The Oniguruma inside `tokenizers` knows them; the
# Unicode tables of llama.cpp (llama-cpp-python 0.3.x) do not, so there they are neither \p{L} nor
# \p{N} and group with punctuation. Found by comparing the two on every code point up to U+2FFFF.
_NEW_LETTERS_DIGITS = (
    r"\x{1C89}-\x{1C8A}\x{A7CB}-\x{A7CD}\x{A7DA}-\x{A7DC}\x{105C0}-\x{105F3}\x{10D40}-\x{10D65}"
    r"\x{10D6F}-\x{10D85}\x{10EC2}-\x{10EC4}\x{11380}-\x{11389}\x{1138B}\x{1138E}\x{11390}-\x{113B5}"
    r"\x{113B7}\x{113D1}\x{113D3}\x{116D0}-\x{116E3}\x{11BC0}-\x{11BE0}\x{11BF0}-\x{11BF9}"
    r"\x{13460}-\x{143FA}\x{16100}-\x{1611D}\x{16130}-\x{16139}\x{16D40}-\x{16D6C}\x{16D70}-\x{16D79}"
    r"\x{18CFF}\x{1CCF0}-\x{1CCF9}\x{1E5D0}-\x{1E5ED}\x{1E5F0}-\x{1E5FA}")


def _as_llama_cpp(regex: str) -> str:
    r"""The regex with \p{L} and \p{N} narrowed to the code points llama.cpp's tables classify so."""
    regex = regex.replace(r"\p{L}", "[\\p{L}&&[^" + _NEW_LETTERS_DIGITS + "]]")
    return regex.replace(r"\p{N}", "[\\p{N}&&[^" + _NEW_LETTERS_DIGITS + "]]")

# name -> (regexes, ignore_merges, default add_bos)
_PRE: dict[str, tuple[list[str], bool, bool]] = {}


def _pre(names: Iterable[str], regexes: list[str], ignore_merges: bool = False, add_bos: bool = False):
    for name in names:
        _PRE[name] = (regexes, ignore_merges, add_bos)


_pre(["default"], _PRE_DEFAULT)
_pre(["gpt2", "gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
      "mellum", "jina-v1-en", "jina-v2-code", "roberta-bpe", "mpt", "olmo", "jais", "trillion",
      "granite-docling", "exaone4"], [_GPT2_RE])
_pre(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"],
     [_LLAMA3_RE], ignore_merges=True, add_bos=True)
_pre(["dbrx", "smaug-bpe", "glm4", "chatglm-bpe"], [_LLAMA3_RE])
_pre(["qwen2", "deepseek-r1-qwen", "kormo", "megrez", "stablelm2", "hunyuan", "grok-2"], [_QWEN2_RE])
_pre(["qwen35"], [_QWEN35_RE])
_pre(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"],
     [r"\p{N}", _GPT2_RE])
_pre(["falcon"], [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_RE, r"[0-9][0-9][0-9]"])
_pre(["deepseek-v3", "hunyuan-dense"], [r"\p{N}{1,3}", r"[一-龥\u3040-ゟ゠-ヿ]+", _DEEPSEEK3_RE])
_pre(["deepseek-coder"], [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"])
_pre(["tekken"], [_TEKKEN_RE], ignore_merges=True, add_bos=True)
_pre(["gpt-4o", "llama4", "minimax-m2"], [_GPT4O_RE])
_pre(["seed-coder"], [_SEED_CODER_RE])
_pre(["bailingmoe", "bailingmoe2", "llada-moe"], [_BAILING_RE])
_pre(["poro-chat", "bloom", "gpt3-finnish"], [_BLOOM_RE])
_pre(["viking"], [_BLOOM_RE, r"\p{N}"])


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    out = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}
_BYTE_TOKEN_RE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


# ---------------------------------------------------------------------------------------------
# SentencePiece-style merges from scores

def _spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Every pair (a, b) of vocabulary tokens whose concatenation is a vocabulary token, ranked by
    that token's score (highest first, then lowest id).

    llama.cpp's SPM tokenizer repeatedly merges the adjacent pair whose concatenation is in the
    vocabulary with the highest score; a BPE model whose merge ranks follow the merged token's
    score does the same. Finding the pairs with Python string slicing costs ~1.5 s for a 262k
    vocabulary, so the prefixes and suffixes of every token are hashed with numpy (polynomial
    hash mod 2**64, lengths compared too) and looked up in an open-addressing table.
    """
    n = len(tokens)
    if n == 0:
        return []
    lens = np.fromiter(map(len, tokens), dtype=np.int64, count=n)
    maxlen = int(lens.max())
    if maxlen < 2:
        return []
    codes = np.frombuffer("".join(tokens).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    codes = codes.astype(np.uint64) + np.uint64(1)
    starts = np.zeros(n, np.int64)
    np.cumsum(lens[:-1], out=starts[1:])
    order = np.argsort(-lens, kind="stable")  # longest first: tokens still growing form a prefix
    sorted_starts = starts[order]
    longer_than = np.searchsorted(-lens[order], -np.arange(maxlen + 1), side="left")  # #(len > j)
    base = np.uint64(0x9E3779B97F4A7C15)
    total = int(longer_than[1:].sum())
    p_tok = np.empty(total, np.int64)   # token whose prefix this is
    p_len = np.empty(total, np.int64)   # prefix length k (0 < k < len)
    p_hash = np.empty(total, np.uint64)
    h = np.zeros(n, np.uint64)
    off = 0
    with np.errstate(over="ignore"):
        for j in range(maxlen):
            cnt = int(longer_than[j])
            h[:cnt] *= base
            h[:cnt] += codes[sorted_starts[:cnt] + j]
            c2 = int(longer_than[j + 1])
            if c2:
                p_tok[off:off + c2] = order[:c2]
                p_len[off:off + c2] = j + 1
                p_hash[off:off + c2] = h[:c2]
                off += c2
        full = np.empty(n, np.uint64)
        full[order] = h
        powers = np.ones(maxlen + 1, np.uint64)
        for i in range(1, maxlen + 1):
            powers[i] = powers[i - 1] * base
        s_len = lens[p_tok] - p_len
        s_hash = full[p_tok] - p_hash * powers[s_len]  # hash(x + y) = hash(x) * B**len(y) + hash(y)

        bits = max(10, int(np.ceil(np.log2(n * 4))))
        mask = (1 << bits) - 1
        shift = np.uint64(64 - bits)
        keys = np.zeros(1 << bits, np.uint64)
        vals = np.full(1 << bits, -1, np.int64)

        def slot(x):
            x = x ^ (x >> np.uint64(33))
            x = x * np.uint64(0xFF51AFD7ED558CCD)
            x = x ^ (x >> np.uint64(33))
            return (x >> shift).astype(np.int64)

        pend = np.arange(n, dtype=np.int64)
        pos = slot(full)
        while len(pend):
            cur = vals[pos]
            taken = cur >= 0
            dup = taken & (keys[pos] == full[pend])
            if dup.any():  # same text twice (llama.cpp keeps one): drop the later copies
                pend, pos, taken = pend[~dup], pos[~dup], taken[~dup]
            free = np.flatnonzero(~taken)
            _, first = np.unique(pos[free], return_index=True)
            win = free[first]
            keys[pos[win]] = full[pend[win]]
            vals[pos[win]] = pend[win]
            placed = np.zeros(len(pend), bool)
            placed[win] = True
            pend, pos = pend[~placed], pos[~placed]
            if len(pend):
                other = (vals[pos] >= 0) & (keys[pos] != full[pend])
                pos = np.where(other, (pos + 1) & mask, pos)

        def lookup(q, qlen):
            res = np.full(len(q), -1, np.int64)
            idx = np.arange(len(q))
            p = slot(q)
            while len(idx):
                v = vals[p]
                hit = (v >= 0) & (keys[p] == q[idx])
                res[idx[hit]] = v[hit]
                more = (v >= 0) & ~hit
                idx, p = idx[more], (p[more] + 1) & mask
            ok = res >= 0
            ok[ok] = lens[res[ok]] == qlen[ok]
            return ok, res

        ok, left = lookup(p_hash, p_len)
        p_tok, s_hash, s_len, left = p_tok[ok], s_hash[ok], s_len[ok], left[ok]
        ok, right = lookup(s_hash, s_len)
        merged, left, right = p_tok[ok], left[ok], right[ok]
    score = np.asarray(scores, dtype=np.float32)
    rank = np.lexsort((merged, -score[merged]))
    left, right = left[rank].tolist(), right[rank].tolist()
    return list(zip([tokens[i] for i in left], [tokens[i] for i in right]))


# ---------------------------------------------------------------------------------------------

class Tokenizer:
    """Text <-> token ids. Build with `from_gguf` or `from_hf_dir`."""

    def __init__(self, *, kind: str, hf, tokens: list[str], attrs: list[int], vocab: dict[str, int],
                 bos_id: int | None, eos_id: int | None, eot_ids: set[int], add_bos: bool,
                 add_eos: bool = False, add_space_prefix: bool = False, chat_template: str | None = None,
                 eot_id: int | None = None, eom_id: int | None = None, unk_id: int | None = None,
                 pad_id: int | None = None, byte_level: bool = False, name: str = "",
                 architecture: str | None = None):
        self._kind = kind  # "spm" | "bpe" (llama.cpp rules) | "hf" (tokenizer.json rules)
        self._hf = hf
        self._tokens = tokens
        self._attrs = attrs
        self._vocab = vocab
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.eot_id = eot_id
        self.eom_id = eom_id
        self.unk_id = unk_id
        self.pad_id = pad_id
        self.eot_ids: set[int] = set(eot_ids)
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.add_space_prefix = add_space_prefix
        self.chat_template = chat_template
        self.name = name
        self.architecture = architecture  # e.g. 'gemma3', for chat_template_for's built-in templates
        self._byte_level = byte_level
        self._pieces: dict[int, bytes] = {}
        self._lock = threading.Lock()
        self._build_special_index()

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, meta: Any) -> "Tokenizer":
        """From GGUF metadata: a dict (GGUFFile.meta), a GGUFFile, or a path to a .gguf file."""
        if isinstance(meta, (str, os.PathLike)):
            from ..formats.gguf import GGUFFile
            meta = GGUFFile(meta).meta
        elif not isinstance(meta, dict) and hasattr(meta, "meta"):
            meta = meta.meta
        model = meta.get("tokenizer.ggml.model")
        if model is None:
            raise OuzelError("the GGUF metadata has no tokenizer (missing 'tokenizer.ggml.model')")
        model = str(model)
        if model not in ("gpt2", "llama"):
            raise UnsupportedError(f"tokenizer model {model!r} (tokenizer.ggml.model) is not supported; "
                                   "supported: 'gpt2' (byte-level BPE), 'llama' (SentencePiece-style)")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise OuzelError("the GGUF metadata has no vocabulary ('tokenizer.ggml.tokens')")
        tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]  # as llama.cpp does
        n = len(tokens)
        types = meta.get("tokenizer.ggml.token_type")
        if types is not None and len(types) < n:
            raise OuzelError(f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
        if types is None:
            attrs = [ATTR_NORMAL] * n
        else:
            t2a = _TYPE_TO_ATTR
            attrs = [t2a.get(t, ATTR_UNDEFINED) for t in types[:n]]
        vocab = dict(zip(tokens, range(n)))  # a repeated text maps to its last id, as in llama.cpp
        pre = meta.get("tokenizer.ggml.pre")
        pre = str(pre) if pre is not None else ""

        from tokenizers import Regex, Tokenizer as HFTokenizer, models, pre_tokenizers

        if model == "llama":
            kind = "spm"
            scores = meta.get("tokenizer.ggml.scores")
            if scores is None:
                scores = [0.0] * n
            elif len(scores) < n:
                raise OuzelError(f"tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")
            merges = _spm_merges(tokens, list(scores[:n]))
            hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=False))
            bos, eos, unk = 1, 2, 0
            add_bos, add_space_prefix = True, True
        else:
            kind = "bpe"
            if pre in _PRE:
                regexes, ignore_merges, add_bos = _PRE[pre]
            elif not pre:
                log.warning("GGUF tokenizer has no pre-tokenizer type (tokenizer.ggml.pre); using 'default'")
                regexes, ignore_merges, add_bos = _PRE["default"]
            else:
                log.warning("unknown pre-tokenizer type %r (tokenizer.ggml.pre); using GPT-2's regex, "
                            "token ids may differ from llama.cpp's", pre)
                regexes, ignore_merges, add_bos = [_GPT2_RE], False, False
            raw_merges = meta.get("tokenizer.ggml.merges")
            if raw_merges is None:
                raise OuzelError("byte-level BPE tokenizer without merges ('tokenizer.ggml.merges')")
            merges = []
            for m in raw_merges:
                cut = m.find(" ", 1)  # llama.cpp splits at the first space after the first character
                if cut < 0:
                    continue
                a, b = m[:cut], m[cut + 1:]
                if a in vocab and b in vocab and a + b in vocab:
                    merges.append((a, b))
            hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                        ignore_merges=ignore_merges))
            hf.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(_as_llama_cpp(r)), behavior="isolated") for r in regexes]
                + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
            bos = eos = 11
            unk = None
            add_space_prefix = False
            if pre in ("glm4", "chatglm-bpe"):
                bos = None

        def special(key, default):
            v = meta.get(f"tokenizer.ggml.{key}")
            if v is None:
                return default
            v = int(v)
            if not 0 <= v < n:
                log.warning("bad special token id tokenizer.ggml.%s = %d (vocab has %d); ignored", key, v, n)
                return default
            return v

        bos = special("bos_token_id", bos)
        eos = special("eos_token_id", eos)
        eot = special("eot_token_id", None)
        eom = special("eom_token_id", None)
        unk = special("unknown_token_id", unk)
        pad = special("padding_token_id", None)
        fim = {k: special(f"fim_{k}_token_id", None) for k in _FIM_TEXTS}
        for k, old in (("pre", "prefix"), ("suf", "suffix"), ("mid", "middle")):
            if fim[k] is None:
                fim[k] = special(f"{old}_token_id", None)
        if "tokenizer.ggml.add_bos_token" in meta:
            add_bos = bool(meta["tokenizer.ggml.add_bos_token"])
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
        if "tokenizer.ggml.add_space_prefix" in meta:
            add_space_prefix = bool(meta["tokenizer.ggml.add_space_prefix"])

        eot, eom, eog = _detect_special(tokens, vocab, attrs, eos, eot, eom, fim)
        name = str(meta.get("general.name", "")).lower()
        if "phi-3" in name or "phi3" in name:  # llama.cpp strips spaces right of these models' specials
            for i, a in enumerate(attrs):
                if a & _PARTITION_ATTRS:
                    attrs[i] = a | ATTR_RSTRIP
            for t, v in (("</s>", True), ("<unk>", False), ("<s>", False), ("<|endoftext|>", False)):
                if t in vocab:
                    i = vocab[t]
                    attrs[i] = attrs[i] | ATTR_RSTRIP if v else attrs[i] & ~ATTR_RSTRIP
        template = meta.get("tokenizer.chat_template")
        return cls(kind=kind, hf=hf, tokens=tokens, attrs=attrs, vocab=vocab, bos_id=bos, eos_id=eos,
                   eot_ids=eog, add_bos=add_bos, add_eos=add_eos, add_space_prefix=add_space_prefix,
                   chat_template=str(template) if template else None, eot_id=eot, eom_id=eom, unk_id=unk,
                   pad_id=pad, byte_level=(kind == "bpe"), name=str(meta.get("general.name", "")),
                   architecture=meta.get("general.architecture"))

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """From a Hugging Face model directory: tokenizer.json (+ tokenizer_config.json,
        generation_config.json, chat_template.jinja / chat_template.json when present)."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise OuzelError(f"{path}: no tokenizer.json")
        try:
            hf = HFTokenizer.from_file(str(tj))
        except Exception as e:
            raise OuzelError(f"{tj}: unreadable tokenizer.json: {e}") from None

        def component(c) -> str:  # a pipeline component's JSON (cheaper than parsing the whole file)
            try:
                state = c.__getstate__() if c is not None else b"null"
                return state.decode("utf-8") if isinstance(state, bytes) else str(state)
            except Exception:
                return type(c).__name__
        config = _read_json(path / "tokenizer_config.json")
        gen = _read_json(path / "generation_config.json")

        vocab = hf.get_vocab(with_added_tokens=True)
        n = max(max(vocab.values(), default=-1) + 1, hf.get_vocab_size(with_added_tokens=True))
        tokens = [""] * n
        for t, i in vocab.items():
            tokens[i] = t
        byte_fallback = bool(getattr(hf.model, "byte_fallback", False))
        attrs = [ATTR_NORMAL] * n
        if byte_fallback:
            for i, t in enumerate(tokens):
                if len(t) == 6 and _BYTE_TOKEN_RE.fullmatch(t):
                    attrs[i] = ATTR_BYTE
        for i, tok in hf.get_added_tokens_decoder().items():
            if i < n:
                attrs[i] = ATTR_CONTROL if tok.special else ATTR_USER_DEFINED
        decoder = component(hf.decoder)
        byte_level = "ByteLevel" in decoder or "ByteLevel" in component(hf.pre_tokenizer)
        add_space_prefix = '"Strip"' in decoder or ('"Metaspace"' in decoder and
                                                     '"never"' not in decoder)

        def tok_id(v):
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                return vocab.get(v)
            return None

        bos = tok_id(config.get("bos_token"))
        eos = tok_id(config.get("eos_token"))
        pad = tok_id(config.get("pad_token"))
        unk = tok_id(config.get("unk_token"))
        eos_ids = set()
        if eos is not None:
            eos_ids.add(eos)
        g = gen.get("eos_token_id")
        for v in (g if isinstance(g, list) else [g]):
            if isinstance(v, int) and 0 <= v < n:
                eos_ids.add(v)
        if eos is None and eos_ids:
            eos = min(eos_ids)
        eot, eom, eog = _detect_special(tokens, vocab, attrs, eos, None, None, {k: None for k in _FIM_TEXTS})
        eog |= eos_ids
        if "add_bos_token" in config:
            add_bos = bool(config["add_bos_token"])
        else:
            add_bos = bos is not None and hf.encode("", add_special_tokens=True).ids[:1] == [bos]
        template = _hf_chat_template(path, config)
        model_type = _read_json(path / "config.json").get("model_type")
        return cls(kind="hf", hf=hf, tokens=tokens, attrs=attrs, vocab=vocab, bos_id=bos, eos_id=eos,
                   eot_ids=eog, add_bos=add_bos, add_eos=bool(config.get("add_eos_token", False)),
                   add_space_prefix=add_space_prefix, chat_template=template, eot_id=eot, eom_id=eom,
                   unk_id=unk, pad_id=pad, byte_level=byte_level, name=path.name,
                   architecture=model_type if isinstance(model_type, str) else None)

    # ---- special-token partition -------------------------------------------------------------

    def _build_special_index(self):
        """A character trie of the tokens that llama.cpp's partition splits off the text."""
        self._special_ids = [i for i, a in enumerate(self._attrs) if a & _PARTITION_ATTRS]
        trie: dict = {}
        for i in self._special_ids:
            node = trie
            for ch in self._tokens[i]:
                node = node.setdefault(ch, {})
            node[None] = i
        self._trie = trie
        first = "".join(sorted(k for k in trie if k is not None))
        self._first_re = re.compile("[" + re.escape(first) + "]") if first else None

    def _partition(self, text: str, parse_special: bool) -> list:
        """llama.cpp's tokenizer_st_partition: a list of token ids (int) and raw text pieces (str)."""
        if not text:
            return []
        if self._first_re is None:
            return [text]
        found = set()
        trie = self._trie
        n = len(text)
        for m in self._first_re.finditer(text):
            node = trie
            j = m.start()
            while j < n:
                node = node.get(text[j])
                if node is None:
                    break
                tid = node.get(None)
                if tid is not None:
                    found.add(tid)
                j += 1
        if not parse_special:
            found = {i for i in found if not self._attrs[i] & _SPECIAL_ATTRS}
        if not found:
            return [text]
        tokens = self._tokens
        # longest (in UTF-8 bytes) first, as llama.cpp sorts its special-token cache
        order = sorted(found, key=lambda i: (-len(tokens[i].encode("utf-8")), i))
        frags: list = [(0, n)]
        for tid in order:
            s = tokens[tid]
            slen = len(s)
            attr = self._attrs[tid]
            out: list = []
            for fr in frags:
                if type(fr) is int:
                    out.append(fr)
                    continue
                start, end = fr
                while True:
                    at = text.find(s, start, end)
                    if at < 0:
                        out.append((start, end))
                        break
                    left_end = at
                    if attr & ATTR_LSTRIP:
                        while left_end > start and text[left_end - 1] in " \t\n\v\f\r":
                            left_end -= 1
                    if left_end > start:
                        out.append((start, left_end))
                    out.append(tid)
                    start = at + slen
                    if attr & ATTR_RSTRIP:
                        while start < end and text[start] in " \t\n\v\f\r":
                            start += 1
                    if start >= end:
                        break
            frags = out
        return [f if type(f) is int else text[f[0]:f[1]] for f in frags]

    # ---- encode / decode ------------------------------------------------------------------------

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`, equal to llama.cpp's
        `llama_tokenize(text, add_special=add_special, parse_special=parse_special)`.

        add_special adds BOS (and EOS) only where the model asks for it. parse_special turns control
        tokens written in the text (e.g. '<|im_start|>') into their ids; user-defined tokens are
        always split off, as in llama.cpp."""
        if not isinstance(text, str):
            raise OuzelError(f"encode() takes a str, not {type(text).__name__}")
        if self._kind == "hf":
            return self._encode_hf(text, add_special, parse_special)
        parts = self._partition(text, parse_special)
        raws: list[str] = []
        if self._kind == "spm":
            prev_special = True
            for p in parts:
                if type(p) is int:
                    prev_special = True
                else:
                    if self.add_space_prefix and prev_special:
                        p = " " + p
                    raws.append(p.replace(" ", "\u2581"))
                    prev_special = False
        else:
            raws = [p for p in parts if type(p) is not int]
        if len(raws) == 1:
            encoded = [self._hf.encode(raws[0], add_special_tokens=False).ids]
        elif raws:
            encoded = [e.ids for e in self._hf.encode_batch(raws, add_special_tokens=False)]
        else:
            encoded = []
        out: list[int] = []
        if add_special and self.add_bos and self.bos_id is not None:
            out.append(self.bos_id)
        k = 0
        for p in parts:
            if type(p) is int:
                out.append(p)
            else:
                out.extend(encoded[k])
                k += 1
        if add_special and self.add_eos and self.eos_id is not None:
            out.append(self.eos_id)
        return out

    def _encode_hf(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        if parse_special:
            return self._hf.encode(text, add_special_tokens=add_special).ids
        with self._lock:
            self._hf.encode_special_tokens = True
            try:
                return self._hf.encode(text, add_special_tokens=add_special).ids
            finally:
                self._hf.encode_special_tokens = False

    def token_bytes(self, token_id: int, special: bool = True) -> bytes:
        """The bytes token `token_id` stands for, as llama.cpp's token_to_piece gives them: a byte
        token gives its byte; a control token its text (b'' when special=False)."""
        attr = self._attr(token_id)
        if not special and attr & _SPECIAL_ATTRS:
            return b""
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._piece(token_id, attr)
            self._pieces[token_id] = piece
        return piece

    def _attr(self, token_id: int) -> int:
        if not 0 <= token_id < len(self._tokens):
            raise OuzelError(f"token id {token_id} is out of range (vocabulary of {len(self._tokens)})")
        return self._attrs[token_id]

    def _piece(self, token_id: int, attr: int) -> bytes:
        text = self._tokens[token_id]
        if attr & (_SPECIAL_ATTRS | ATTR_USER_DEFINED):
            return text.encode("utf-8")
        if attr & ATTR_NORMAL:
            if not self._byte_level:
                return text.replace("\u2581", " ").encode("utf-8")
            out = bytearray()
            for ch in text:
                b = _CHAR_TO_BYTE.get(ch)
                if b is None:  # llama.cpp's llama_decode_text marks characters outside the byte map
                    out += b"[UNK_BYTE_0x" + ch.encode("utf-8").hex().encode() + text.encode("utf-8") + b"]"
                else:
                    out.append(b)
            return bytes(out)
        if attr & ATTR_BYTE:
            m = _BYTE_TOKEN_RE.fullmatch(text)
            return bytes([int(m.group(1), 16)]) if m else b""
        return b""  # unused / undefined tokens render as nothing

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """The text of `ids`: llama.cpp's pieces joined, invalid UTF-8 replaced by U+FFFD.
        skip_special drops control tokens (BOS, EOS, <|im_start|>, ...)."""
        special = not skip_special
        return b"".join(self.token_bytes(int(i), special) for i in ids).decode("utf-8", "replace")

    def stream(self, show_special: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, show_special=show_special)

    # ---- vocabulary -------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry (its stored text, e.g. 'Ġthe' or '▁the'), or None."""
        return self._vocab.get(token)

    def id_to_token(self, token_id: int) -> str:
        self._attr(token_id)
        return self._tokens[token_id]

    def is_special(self, token_id: int) -> bool:
        """Control (or unknown) token: BOS, EOS, <|im_start|>, <end_of_turn>, ..."""
        return bool(self._attr(token_id) & _SPECIAL_ATTRS)

    def is_eog(self, token_id: int) -> bool:
        return token_id in self.eot_ids

    def token_attr(self, token_id: int) -> int:
        """llama.cpp's attribute bits of the token (ATTR_* constants)."""
        return self._attr(token_id)

    @property
    def bos_token(self) -> str:
        return self._tokens[self.bos_id] if self.bos_id is not None else ""

    @property
    def eos_token(self) -> str:
        return self._tokens[self.eos_id] if self.eos_id is not None else ""

    def __repr__(self) -> str:
        return (f"Tokenizer({self._kind}, vocab={len(self._tokens)}, bos={self.bos_id}, eos={self.eos_id}, "
                f"eog={sorted(self.eot_ids)})")


def _detect_special(tokens, vocab, attrs, eos, eot, eom, fim) -> tuple:
    """llama.cpp's load-time detection of special tokens by their text. Marks the tokens it finds
    as control tokens (in `attrs`) and returns (eot, eom, end-of-generation ids)."""

    def find(texts):
        ids = [vocab[t] for t in texts if t in vocab]
        return min(ids) if ids else None

    def control(i):
        attrs[i] |= ATTR_CONTROL

    if eot is None:
        eot = find(_EOT_TEXTS)
        if eot is not None:
            control(eot)
    if eom is None:
        eom = find(_EOM_TEXTS)
        if eom is not None:
            control(eom)
    for k, texts in _FIM_TEXTS.items():
        if fim[k] is None:
            fim[k] = find(texts)
            if fim[k] is not None:
                control(fim[k])
    for t, i in vocab.items():  # unused control tokens, as llama.cpp marks them
        if "unused" in t and attrs[i] & ATTR_CONTROL:
            attrs[i] |= ATTR_UNUSED
    eog = {fim[k] for k in ("pad", "rep", "sep") if fim[k] is not None}
    for t in _EOG_TEXTS:
        i = vocab.get(t)
        if i is not None:
            eog.add(i)
            control(i)
    for t in _ALWAYS_RENDERED:
        if t in vocab:
            attrs[vocab[t]] = ATTR_USER_DEFINED
    for i in (eos, eot, eom):
        if i is not None:
            eog.add(i)
    texts = {tokens[i]: i for i in eog}
    if "<|end|>" in texts and (("<|return|>" in texts and "<|call|>" in texts)
                               or ("<|calls|>" in texts and "<|flush|>" in texts)):
        eog.discard(texts["<|end|>"])
        attrs[texts["<|end|>"]] = ATTR_USER_DEFINED
    if "<|tool_response>" in texts and "</s>" in texts:
        eog.discard(texts["</s>"])
        attrs[texts["</s>"]] = ATTR_NORMAL
    return eot, eom, eog


def _read_json(p: Path) -> dict:
    if not p.is_file():
        return {}
    try:
        v = json.loads(p.read_text(encoding="utf-8"))
    except Exception as e:
        raise OuzelError(f"{p}: unreadable JSON: {e}") from None
    return v if isinstance(v, dict) else {}


def _hf_chat_template(path: Path, config: dict) -> str | None:
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    t = config.get("chat_template")
    if t is None:
        t = _read_json(path / "chat_template.json").get("chat_template")
    if isinstance(t, list):  # [{"name": ..., "template": ...}]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    return t if isinstance(t, str) else None


class StreamDecoder:
    """Turns token ids, one at a time, into text without ever splitting a UTF-8 character:
    bytes of an incomplete character are held until the rest arrives (or `flush`).
    Control tokens produce nothing unless show_special is set."""

    def __init__(self, tokenizer: Tokenizer, show_special: bool = False):
        self.tokenizer = tokenizer
        self.show_special = show_special
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._dec.decode(self.tokenizer.token_bytes(int(token_id), self.show_special))

    def flush(self) -> str:
        """Whatever is held back (an incomplete character decodes as U+FFFD); resets the decoder."""
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        return out
