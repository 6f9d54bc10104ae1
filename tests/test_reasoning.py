"""Reasoning controls and <think> splitting: the splitter on recorded replies in any chunking, the
request fields as chat-template variables, and a real server of a tiny thinking model."""
from __future__ import annotations

import json
import random

import httpx
import pytest

from ouzel.server import params
from ouzel.server.errors import ApiError
from ouzel.text.chat import ChatTemplate
from ouzel.text.reasoning import ReasoningStream, opens_thought, reply_events, split_reasoning, thinks
from ouzel.text.tool_formats import FORMATS, ToolStream

# Recorded replies: Qwen3 writes both tags; DeepSeek R1's template opens the thought in the
# prompt, so the reply starts inside it and only closes it.
QWEN3 = ("<think>\nThe user asks for the capital of France. That is Paris.\n</think>\n\n"
         "The capital of France is **Paris**.")
R1 = "Okay, 2 + 2: add them, 4.\n</think>\n\nThe answer is 4."
CASES = [
    (QWEN3, False, "The user asks for the capital of France. That is Paris.", "The capital of France is **Paris**."),
    (R1, True, "Okay, 2 + 2: add them, 4.", "The answer is 4."),
    ("<think>\n\n</think>\n\nHi there.", False, "", "Hi there."),                 # thinking switched off
    ("<think>\nStill thinking when max_tokens ran out", False, "Still thinking when max_tokens ran out", ""),
    ("Cut off inside the thought <", True, "Cut off inside the thought <", ""),
    ("  Plain reply, no thought. a<think>b</think>", False, "", "  Plain reply, no thought. a<think>b</think>"),
    ("<thin", False, "", "<thin"),                                                # a lookalike stays text
    ("", False, "", ""),
]


def chunkings(text: str):
    yield [text]
    yield list(text)                                       # every character
    for n in (2, 3, 7):
        yield [text[i:i + n] for i in range(0, len(text), n)]
    rng = random.Random(len(text))
    for _ in range(5):
        cuts = sorted(rng.sample(range(len(text) + 1), min(4, len(text) + 1)))
        yield [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


def streamed(chunks, inside: bool) -> tuple[str, str]:
    s, events = ReasoningStream(inside), []
    for c in chunks:
        events += s.push(c)
    events += s.finish()
    assert all(e[1] for e in events)  # no empty events
    return "".join(v for k, v in events if k == "reasoning"), "".join(v for k, v in events if k == "text")


@pytest.mark.parametrize("text,inside,thought,answer", CASES)
def test_split_in_any_chunking_equals_whole(text, inside, thought, answer):
    assert split_reasoning(text, inside) == (thought, answer)
    for chunks in chunkings(text):
        assert streamed(chunks, inside) == (thought, answer), chunks


def test_reasoning_streams_before_the_thought_ends():
    s = ReasoningStream()
    first = [e for c in QWEN3[:40] for e in s.push(c)]
    assert first and first[0][0] == "reasoning" and QWEN3[8:30] in "".join(v for _, v in first)


def test_tool_calls_are_parsed_in_the_answer_only():
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    text = f"<think>\nI could write <tool_call> here, but I should call the tool.\n</think>\n\nChecking.{call}"
    for chunks in chunkings(text):
        split, parser = ReasoningStream(), ToolStream(FORMATS["hermes"])
        events = [e for c in chunks for e in reply_events(split, parser, c)] + reply_events(split, parser, "", True)
        assert "".join(v for k, v in events if k == "reasoning") == \
            "I could write <tool_call> here, but I should call the tool."
        assert "".join(v for k, v in events if k == "text") == "Checking."
        done = [v for k, v in events if k == "call_done"]
        assert [(c.name, json.loads(c.arguments)) for c in done] == [("get_weather", {"city": "Paris"})]


def test_thinking_model_detection():
    assert thinks("{{ '<think>\\n' }}") and not thinks("{{ messages }}")
    assert opens_thought("<|im_start|>assistant\n<think>\n")
    assert not opens_thought("<|im_start|>assistant\n<think>\n\n</think>\n\n") and not opens_thought("Hi")


# A chat template that branches on the variables the reasoning controls set (Qwen3 keeps an
# assistant turn's reasoning_content; DeepSeek reads `thinking`; gpt-oss `reasoning_effort`).
TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>"
    "{% if m.role == 'assistant' and m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}"
    "{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>"
    "{% if reasoning_effort is defined %}[effort={{ reasoning_effort }}]{% endif %}"
    "{% if thinking is defined %}[thinking={{ thinking }}]{% endif %}"
    "{% if style is defined %}[style={{ style }}]{% endif %}"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}"
    "{% endif %}")
MSGS = [{"role": "user", "content": "Hi"}]


def render(**kw) -> str:
    return ChatTemplate(TEMPLATE).render(MSGS, **kw)


def test_request_fields_become_template_variables():
    default = render()
    assert default.endswith("<|assistant|><think>\n") and opens_thought(default)
    off = render(**params.openai_chat_reasoning({"chat_template_kwargs": {"enable_thinking": False}}))
    assert off.endswith("<|assistant|><think>\n\n</think>\n\n") and not opens_thought(off)
    none = render(**params.openai_chat_reasoning({"reasoning_effort": "none"}))
    assert "[effort=none][thinking=False]" in none and not opens_thought(none)
    high = render(**params.openai_chat_reasoning({"reasoning_effort": "high", "chat_template_kwargs": {"style": "x"}}))
    assert "[effort=high][thinking=True][style=x]<think>\n" in high
    # chat_template_kwargs win over reasoning_effort: they are the template's own switch
    both = params.openai_chat_reasoning({"reasoning_effort": "high",
                                         "chat_template_kwargs": {"enable_thinking": False}})
    assert render(**both).endswith("</think>\n\n")
    low = params.responses_reasoning({"reasoning": {"effort": "low"}})[0]
    assert render(**low).endswith("[effort=low][thinking=True]<think>\n")
    assert params.responses_reasoning({"reasoning": {"summary": "auto"}}) == ({}, "auto")
    off = params.anthropic_thinking({"thinking": {"type": "disabled"}}, 64)
    assert render(**off).endswith("[thinking=False]<think>\n\n</think>\n\n")
    assert render(**params.anthropic_thinking({"thinking": {"type": "enabled", "budget_tokens": 32}}, 64)) == \
        render(**params.anthropic_thinking({"thinking": {"type": "adaptive"}}, 64)) != default
    # an assistant turn's reasoning_content reaches templates that keep it
    convo = MSGS + [{"role": "assistant", "content": "Hello!", "reasoning_content": "Greet back."}]
    assert "<|assistant|><think>Greet back.</think>Hello!" in ChatTemplate(TEMPLATE).render(convo)


@pytest.mark.parametrize("fn,body,needle", [
    (params.openai_chat_reasoning, {"reasoning_effort": "extreme"}, "reasoning_effort"),
    (params.openai_chat_reasoning, {"reasoning_effort": 3}, "reasoning_effort"),
    (params.openai_chat_reasoning, {"chat_template_kwargs": "enable_thinking"}, "chat_template_kwargs"),
    (params.openai_chat_reasoning, {"chat_template_kwargs": {"messages": []}}, "messages"),
    (params.responses_reasoning, {"reasoning": "high"}, "reasoning"),
    (params.responses_reasoning, {"reasoning": {"effort": "huge"}}, "reasoning.effort"),
    (params.responses_reasoning, {"reasoning": {"summary": "long"}}, "reasoning.summary"),
    (lambda b: params.anthropic_thinking(b, 64), {"thinking": {"type": "on"}}, "thinking.type"),
    (lambda b: params.anthropic_thinking(b, 64), {"thinking": {"type": "enabled"}}, "budget_tokens"),
    (lambda b: params.anthropic_thinking(b, 64), {"thinking": {"type": "enabled", "budget_tokens": "9"}},
     "thinking.budget_tokens"),
    (lambda b: params.anthropic_thinking(b, 64), {"thinking": {"type": "enabled", "budget_tokens": 64}}, "max_tokens"),
    (lambda b: params.anthropic_thinking(b, 64), {"thinking": True}, "thinking"),
])
def test_bad_reasoning_fields_are_400(fn, body, needle):
    with pytest.raises(ApiError) as e:
        fn(body)
    assert e.value.status == 400 and needle in e.value.message


# --- a real server of a tiny random-weight model whose template thinks ---

@pytest.fixture(scope="module")
def thinking_server(tmp_path_factory):
    tm = pytest.importorskip("tiny_models")
    from server_util import Server
    d = tmp_path_factory.mktemp("thinking")
    model = tm.save_hf_dir(tm.build_hf_model("llama"), d / "hf")
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TEMPLATE}))
    s = Server("-m", str(model), "--model-id", "thinker", "--ctx", "256", "--keepalive-s", "0.5",
               log_path=str(d / "server.log"))
    yield s
    s.stop()


# random weights: the reply is noise, continued inside the thought the prompt opened (or, with
# thinking off, plain text); ignore_eos keeps it N tokens long
GEN = {"temperature": 0, "ignore_eos": True}


def test_openai_chat_reasoning_content(thinking_server):
    openai = pytest.importorskip("openai")
    c = openai.OpenAI(base_url=thinking_server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    kw = dict(model="thinker", messages=MSGS, max_tokens=8, extra_body=GEN)
    on = c.chat.completions.create(reasoning_effort="high", **kw)
    thought = on.choices[0].message.model_extra["reasoning_content"]
    assert thought and not on.choices[0].message.content
    chunks = list(c.chat.completions.create(reasoning_effort="high", stream=True, **kw))
    assert "".join((ch.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                   for ch in chunks if ch.choices) == thought
    assert not any(ch.choices[0].delta.content for ch in chunks if ch.choices)
    default = c.chat.completions.create(**kw)  # the template's default: thinking on
    assert default.choices[0].message.model_extra["reasoning_content"]
    assert on.usage.prompt_tokens > default.usage.prompt_tokens  # "[effort=high][thinking=True]"
    off = c.chat.completions.create(**{**kw, "extra_body": {**GEN, "chat_template_kwargs": {"enable_thinking": False}}})
    assert off.choices[0].message.content and "reasoning_content" not in (off.choices[0].message.model_extra or {})
    assert off.usage.prompt_tokens > default.usage.prompt_tokens  # the template closed an empty thought
    # the thought sent back with the assistant turn reaches the template; nothing chokes on it
    again = c.chat.completions.create(model="thinker", max_tokens=2, extra_body=GEN, messages=MSGS + [
        {"role": "assistant", "content": "", "reasoning_content": thought}, {"role": "user", "content": "Go on."}])
    assert again.usage.prompt_tokens > on.usage.prompt_tokens + 2


def test_anthropic_thinking_blocks(thinking_server):
    anthropic = pytest.importorskip("anthropic")
    c = anthropic.Anthropic(base_url=thinking_server.url, api_key="none", max_retries=0, timeout=60)
    kw = dict(model="thinker", max_tokens=8, messages=MSGS, extra_body=GEN,
              thinking={"type": "enabled", "budget_tokens": 4})
    r = c.messages.create(**kw)
    assert [b.type for b in r.content] == ["thinking"] and r.content[0].thinking
    with c.messages.stream(**kw) as s:
        events = list(s)
        final = s.get_final_message()
    assert final.content[0].type == "thinking" and final.content[0].thinking == r.content[0].thinking
    assert any(e.type == "content_block_delta" and e.delta.type == "thinking_delta" for e in events)
    off = c.messages.create(**{**kw, "thinking": {"type": "disabled"}})
    assert [b.type for b in off.content] == ["text"]
    # the thinking block sent back is taken (as the turn's reasoning), not refused
    back = c.messages.create(model="thinker", max_tokens=2, extra_body=GEN, messages=MSGS + [
        {"role": "assistant", "content": [b.model_dump() for b in r.content] + [{"type": "text", "text": "ok"}]},
        {"role": "user", "content": "Go on."}])
    assert back.usage.input_tokens > r.usage.input_tokens


def test_responses_reasoning_item(thinking_server):
    openai = pytest.importorskip("openai")
    c = openai.OpenAI(base_url=thinking_server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    kw = dict(model="thinker", input="Hi", max_output_tokens=8, extra_body=GEN,
              reasoning={"effort": "medium", "summary": "auto"})
    r = c.responses.create(**kw)
    item = r.output[0]
    assert item.type == "reasoning" and item.content[0].text and item.summary[0].text == item.content[0].text
    events = list(c.responses.create(stream=True, **kw))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == item.content[0].text
    done = events[-1].response
    assert done.output[0].type == "reasoning" and done.output[0].content[0].text == item.content[0].text
    # the stored reasoning item comes back as input through previous_response_id
    follow = c.responses.create(model="thinker", input="Go on.", previous_response_id=r.id, max_output_tokens=2,
                                extra_body=GEN, reasoning={"effort": "none"})
    assert follow.output[0].type == "message" and follow.usage.input_tokens > r.usage.input_tokens


@pytest.mark.parametrize("path,body,needle", [
    ("/v1/chat/completions", {"messages": MSGS, "reasoning_effort": "maximal"}, "reasoning_effort"),
    ("/v1/chat/completions", {"messages": MSGS, "chat_template_kwargs": ["enable_thinking"]}, "chat_template_kwargs"),
    ("/v1/chat/completions", {"messages": MSGS + [{"role": "assistant", "content": "x", "reasoning_content": 5}]},
     "reasoning_content"),
    ("/v1/responses", {"input": "x", "reasoning": {"effort": 1}}, "reasoning.effort"),
    ("/v1/messages", {"messages": MSGS, "max_tokens": 8, "thinking": {"type": "enabled", "budget_tokens": 0}},
     "budget_tokens"),
    ("/v1/messages", {"messages": MSGS, "max_tokens": 8, "thinking": {"type": "sometimes"}}, "thinking.type"),
])
def test_bad_reasoning_requests_get_4xx(thinking_server, path, body, needle):
    r = httpx.post(thinking_server.url + path, json={**body, "max_tokens": 2} if "max_tokens" not in body else body,
                   timeout=30)
    assert r.status_code == 400 and needle in r.text, r.text


# --- the three APIs' streams of one reply (thought, answer, tool call), checked against the SDK types ---

def _reply():
    from ouzel.engine.request import Usage
    from ouzel.server.engine import Delta
    from ouzel.text.tool_formats import ToolCall
    call = ToolCall.new("get_weather", {"city": "Paris"})
    return [Delta("reasoning", "Need the "), Delta("keepalive"), Delta("reasoning", "weather."),
            Delta("text", "Checking."), Delta("call_start", call=call), Delta("call_done", call=call),
            Delta("done", finish_reason="tool_calls", usage=Usage(10, 7))]


async def _run(deltas):
    for d in deltas:
        yield d


def _events(gen) -> list:
    import asyncio

    async def go():
        return [e async for e in gen if e is not None]
    return asyncio.run(go())


def test_stream_shapes_openai_chat():
    openai = pytest.importorskip("openai")
    from ouzel.server.openai import _chat_chunks
    chunks = [openai.types.chat.ChatCompletionChunk.model_validate(c)
              for c in _events(_chat_chunks(_run(_reply()), {"id": "x", "created": 0, "model": "m"}, False))]
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == "Need the weather."
    assert "".join(d.content or "" for d in deltas) == "Checking."
    first = [i for i, d in enumerate(deltas) if d.model_extra.get("reasoning_content") or d.content or d.tool_calls]
    assert deltas[first[0]].model_extra.get("reasoning_content") and deltas[first[-1]].tool_calls


def test_stream_shapes_anthropic():
    anthropic = pytest.importorskip("anthropic")
    from pydantic import TypeAdapter

    from ouzel.server.anthropic import _events as events
    raw = _events(events(_run(_reply()), {"id": "msg_x", "type": "message", "role": "assistant", "model": "m"}, 10))
    evs = [TypeAdapter(anthropic.types.RawMessageStreamEvent).validate_python(e) for e in raw if e["type"] != "ping"]
    starts = [(e.index, e.content_block.type) for e in evs if e.type == "content_block_start"]
    assert starts == [(0, "thinking"), (1, "text"), (2, "tool_use")]
    assert [e.index for e in evs if e.type == "content_block_stop"] == [0, 1, 2]
    deltas = [e.delta for e in evs if e.type == "content_block_delta"]
    assert "".join(d.thinking for d in deltas if d.type == "thinking_delta") == "Need the weather."


def test_stream_shapes_responses():
    openai = pytest.importorskip("openai")
    from pydantic import TypeAdapter

    from ouzel.server.responses import _events as events
    head = {"id": "resp_x", "object": "response", "created_at": 0, "model": "m", "tool_choice": "auto", "tools": [],
            "parallel_tool_calls": True}
    saved = []
    raw = _events(events(_run(_reply()), head, saved.append, "auto"))
    evs = [TypeAdapter(openai.types.responses.ResponseStreamEvent).validate_python(e) for e in raw]
    added = [(e.output_index, e.item.type) for e in evs if e.type == "response.output_item.added"]
    assert added == [(0, "reasoning"), (1, "message"), (2, "function_call")]
    assert [(e.output_index, e.item.type) for e in evs if e.type == "response.output_item.done"] == added
    assert "".join(e.delta for e in evs if e.type == "response.reasoning_summary_text.delta") == "Need the weather."
    out = evs[-1].response.output
    assert [o.type for o in out] == ["reasoning", "message", "function_call"]
    assert out[0].content[0].text == out[0].summary[0].text == "Need the weather."
    assert saved[0][0]["type"] == "reasoning"
