"""Tokenization equals llama.cpp's ids on the committed reference strings (no llama.cpp needed)."""
import pytest

from conftest import MODELS, have_model, reference

FLAGS = {"bos_special": (True, True), "bos_nospecial": (True, False),
         "nobos_special": (False, True), "nobos_nospecial": (False, False)}

_TOK = {}


def tokenizer(key):
    if not have_model(key):
        pytest.skip(f"{key} not installed")
    if key not in _TOK:
        from ouzel.formats.gguf import GGUFFile
        from ouzel.hub import resolve
        from ouzel.text.tokenizer import Tokenizer
        _TOK[key] = Tokenizer.from_gguf(GGUFFile(resolve(key)).meta)
    return _TOK[key]


@pytest.mark.parametrize("key", MODELS)
def test_ids_equal_llamacpp(key):
    tok, bad = tokenizer(key), []
    for case in reference(key, "_tokens")["cases"]:
        for flag, (add_special, parse_special) in FLAGS.items():
            got = tok.encode(case["text"], add_special=add_special, parse_special=parse_special)
            if got != case["ids"][flag]:
                bad.append((case["name"], flag, got[:12], case["ids"][flag][:12]))
    assert not bad, bad


@pytest.mark.parametrize("key", MODELS)
def test_detokenize_equals_llamacpp(key):
    tok = tokenizer(key)
    for case in reference(key, "_tokens")["cases"]:
        assert tok.decode(case["ids"]["nobos_special"]) == case["detokenized_nobos_special"], case["name"]
