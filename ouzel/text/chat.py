"""Chat templates: the model's Jinja template rendered the way Hugging Face transformers renders it
(sandboxed, trim_blocks/lstrip_blocks, raise_exception, strftime_now, a tojson that does not
HTML-escape), plus built-in templates for model families whose files ship without one."""
from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Mapping

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import OuzelError

# Gemma (1, 2, 3) turn format; GGUF files converted from Gemma checkpoints often carry no template.
# The system message has no turn of its own: it opens the first user turn, followed by a blank line.
GEMMA_TEMPLATE = """{{- bos_token -}}
{%- set turns = messages -%}
{%- set prefix = '' -%}
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set turns = messages[1:] -%}
{%- endif -%}
{%- for message in turns -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}
    {%- endif -%}
    {{- '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' -}}
    {%- if loop.first -%}{{- prefix -}}{%- endif -%}
    {%- if message['content'] is string -%}
        {{- message['content'] | trim -}}
    {%- elif message['content'] -%}
        {%- for part in message['content'] -%}
            {%- if part['type'] == 'image' -%}
                {{- '<start_of_image>' -}}
            {%- elif part['type'] == 'text' -%}
                {{- part['text'] | trim -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{- '<end_of_turn>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<start_of_turn>model\\n' -}}
{%- endif -%}
"""

# architecture prefix -> template, for families whose GGUF files may lack tokenizer.chat_template
FALLBACK_TEMPLATES = {
    "gemma": GEMMA_TEMPLATE,
}


class _TemplateRaised(jinja2.exceptions.TemplateError):
    """raise_exception() called by the template itself."""


def _raise_exception(message: Any = "") -> None:
    raise _TemplateRaised(str(message))


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # Like transformers: plain json.dumps, no HTML escaping (Jinja's own tojson escapes <, >, &, ')
    if isinstance(separators, list):
        separators = tuple(separators)
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """namespace() that refuses underscore-prefixed attributes (no reaching CPython internals)."""

    def __init__(*args: Any, **kwargs: Any):  # noqa: N805 - same calling trick as jinja2's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for key in attrs:
            _Namespace._check(key)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, key: str, value: Any) -> None:
        _Namespace._check(key)
        jinja2.utils.Namespace.__setitem__(self, key, value)

    @staticmethod
    def _check(key: Any) -> None:
        if isinstance(key, str) and key.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {key!r} is not allowed")


def _make_dict(*args: Any, **kwargs: Any) -> dict:
    return dict(*args, **kwargs)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (used by transformers to mark assistant text):
    renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _plain(value: Any) -> Any:
    """Template inputs rebuilt from plain JSON-like types, so the template sees no methods of
    arbitrary caller objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "model_dump") and callable(value.model_dump):
        return _plain(value.model_dump())
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return _plain(value.item())
        except Exception:
            pass
    return f"<{type(value).__name__}>"


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    env.globals["dict"] = _make_dict
    return env


class ChatTemplate:
    """A compiled chat template. `render(messages)` gives the prompt text (special tokens written
    as text: encode it with parse_special=True)."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        if not isinstance(source, str) or not source.strip():
            raise OuzelError("empty chat template")
        self.source = source
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise OuzelError(f"chat template has a syntax error (line {e.lineno}): {e.message}") from None
        except jinja2.exceptions.TemplateError as e:
            raise OuzelError(f"chat template cannot be compiled: {e}") from None

    def render(self, messages: list[Mapping[str, Any]], add_generation_prompt: bool = True,
               tools: list | None = None, **extra: Any) -> str:
        if not isinstance(messages, (list, tuple)):
            raise OuzelError(f"messages must be a list of {{'role': ..., 'content': ...}}, "
                             f"not {type(messages).__name__}")
        msgs = _plain(list(messages))
        for m in msgs:
            if not isinstance(m, dict):
                raise OuzelError(f"each message must be a dict with 'role' and 'content', got {m!r}")
        context = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        context.update(_plain(extra))
        context.update(messages=msgs, tools=_plain(tools), add_generation_prompt=bool(add_generation_prompt))
        context.setdefault("documents", None)
        try:
            return self._template.render(**context)
        except _TemplateRaised as e:
            raise OuzelError(f"chat template refused the conversation: {e.message}") from None
        except jinja2.exceptions.SecurityError as e:
            raise OuzelError(f"chat template tried something the sandbox forbids: {e}") from None
        except jinja2.exceptions.TemplateError as e:
            raise OuzelError(f"chat template failed to render: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError,
                RecursionError, OverflowError) as e:
            raise OuzelError(f"chat template failed to render: {type(e).__name__}: {e}") from None

    def __repr__(self) -> str:
        return f"ChatTemplate({len(self.source)} chars, bos={self.bos_token!r}, eos={self.eos_token!r})"


def fallback_template(architecture: str | None) -> str | None:
    """The built-in template for an architecture whose files may ship without one, or None."""
    arch = (architecture or "").lower()
    for prefix, source in FALLBACK_TEMPLATES.items():
        if arch.startswith(prefix):
            return source
    return None


def chat_template_for(meta_or_tokenizer: Any, architecture: str | None = None) -> ChatTemplate:
    """The model's chat template: the one in its files, else a built-in one for its family.

    meta_or_tokenizer: a `Tokenizer` or a GGUF metadata dict. architecture: e.g. 'gemma3'
    (taken from 'general.architecture' when not given)."""
    source, bos, eos = _template_source(meta_or_tokenizer)
    if architecture is None:
        if isinstance(meta_or_tokenizer, Mapping):
            architecture = meta_or_tokenizer.get("general.architecture")
        else:
            architecture = getattr(meta_or_tokenizer, "architecture", None)
    if not source:
        source = fallback_template(architecture)
    if not source:
        raise OuzelError(f"the model has no chat template and ouzel has none built in for "
                         f"architecture {architecture!r}; pass a template or use plain completion")
    return ChatTemplate(source, bos, eos)


def encode_chat_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a rendered chat prompt: special tokens written in it are parsed, BOS is added
    when the model wants one and the template did not already write it, and no EOS is appended."""
    ids = tokenizer.encode(prompt, add_special=False, parse_special=True)
    bos = tokenizer.bos_id
    if tokenizer.add_bos and bos is not None and ids[:1] != [bos]:
        ids.insert(0, bos)
    return ids


def _template_source(obj: Any) -> tuple[str | None, str, str]:
    if isinstance(obj, Mapping):
        tokens = obj.get("tokenizer.ggml.tokens") or []

        def text(key: str, default: int | None) -> str:
            i = obj.get(key, default)
            try:
                i = int(i)
            except (TypeError, ValueError):
                return ""
            return tokens[i] if 0 <= i < len(tokens) else ""

        spm = obj.get("tokenizer.ggml.model") == "llama"
        source = obj.get("tokenizer.chat_template")
        return (str(source) if source else None, text("tokenizer.ggml.bos_token_id", 1 if spm else None),
                text("tokenizer.ggml.eos_token_id", 2 if spm else None))
    if hasattr(obj, "chat_template") and hasattr(obj, "bos_token"):
        return obj.chat_template, obj.bos_token, obj.eos_token
    if hasattr(obj, "meta"):  # a GGUFFile
        return _template_source(obj.meta)
    raise OuzelError(f"chat_template_for() needs a Tokenizer or GGUF metadata, not {type(obj).__name__}")
