"""OpenAI Chat Completions and (legacy) Completions."""
from __future__ import annotations

import secrets
import time

from fastapi import APIRouter, Request

from . import params
from .app import check_model, read_body, sse
from .errors import ApiError, field
from .prompt import openai_tools

router = APIRouter()


def usage_json(u) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def chat_logprobs(lps) -> dict:
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()),
                         "top_logprobs": [{"token": a, "logprob": alp, "bytes": list(a.encode())} for a, alp in top]}
                        for t, lp, top in lps]}


def call_json(call, index: int | None = None, arguments: bool = True) -> dict:
    out = {"id": call.id, "type": "function", "function": {"name": call.name}}
    out["function"]["arguments"] = call.arguments if arguments else ""
    if index is not None:
        out["index"] = index
    return out


def _stream_options(body: dict) -> bool:
    opts = field(body, "stream_options", dict, {})
    return bool(opts.get("include_usage"))


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    engine = request.app.state.engine
    body = await read_body(request)
    check_model(engine, body)
    tools = openai_tools(body.get("tools"))
    tool_choice = body.get("tool_choice")
    ids, forced, text = engine.chat.build(body.get("messages"), tools, tool_choice,
                                          params.openai_chat_reasoning(body))
    p = params.sampling(body, engine.ctx_left(ids), max_names=("max_tokens", "max_completion_tokens"))
    lp = params.logprobs(body)
    engine.validate(ids, p)
    head = {"id": "chatcmpl-" + secrets.token_hex(12), "created": int(time.time()), "model": engine.model_id}
    kw = dict(logprobs=lp, tools=bool(tools) and tool_choice != "none", forced=forced, text=text, reasoning=True,
              is_disconnected=request.is_disconnected)
    if field(body, "stream", bool, False):
        run = engine.stream(ids, p, **kw)
        return sse(_chat_chunks(run, head, _stream_options(body)), run=run, done=True)
    r = await engine.collect(ids, p, **kw)
    message = {"role": "assistant", "content": r["text"] if (r["text"] or not r["calls"]) else None}
    if r["reasoning"]:
        message["reasoning_content"] = r["reasoning"]  # the DeepSeek / vLLM field
    if r["calls"]:
        message["tool_calls"] = [call_json(c) for c in r["calls"]]
    choice = {"index": 0, "message": message, "finish_reason": r["finish_reason"],
              "logprobs": chat_logprobs(r["logprobs"]) if lp is not None else None}
    return {**head, "object": "chat.completion", "choices": [choice], "usage": usage_json(r["usage"])}


async def _chat_chunks(run, head: dict, include_usage: bool):
    def chunk(delta: dict, finish=None, logprobs=None) -> dict:
        return {**head, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]}
    yield chunk({"role": "assistant", "content": ""})
    n_calls = 0
    async for d in run:
        if d.kind == "keepalive":
            yield None
        elif d.kind in ("text", "reasoning") and d.text:
            key = "content" if d.kind == "text" else "reasoning_content"
            yield chunk({key: d.text}, logprobs=chat_logprobs(d.logprobs) if d.logprobs else None)
        elif d.kind == "call_start":
            yield chunk({"tool_calls": [call_json(d.call, n_calls, arguments=False)]})
        elif d.kind == "call_done":
            yield chunk({"tool_calls": [{"index": n_calls, "function": {"arguments": d.call.arguments}}]})
            n_calls += 1
        elif d.kind == "done":
            yield chunk({}, d.finish_reason)
            if include_usage:
                yield {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage_json(d.usage)}


@router.post("/v1/completions")
async def completions(request: Request):
    engine = request.app.state.engine
    body = await read_body(request)
    check_model(engine, body)
    if "prompt" not in body:
        raise ApiError(400, "'prompt' is required", param="prompt")
    ids = engine.encode(body["prompt"])
    p = params.sampling(body, engine.ctx_left(ids))
    lp = params.logprobs(body)
    engine.validate(ids, p)
    echo = field(body, "echo", bool, False)
    rid, created = "cmpl-" + secrets.token_hex(12), int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": engine.model_id}
    if field(body, "stream", bool, False):
        run = engine.stream(ids, p, logprobs=lp, is_disconnected=request.is_disconnected)
        return sse(_completion_chunks(run, head, _stream_options(body)), run=run, done=True)
    r = await engine.collect(ids, p, logprobs=lp, is_disconnected=request.is_disconnected)
    text = (engine.llm.detokenize(ids) if echo else "") + r["text"]
    choice = {"index": 0, "text": text, "finish_reason": r["finish_reason"],
              "logprobs": _completion_logprobs(r["logprobs"]) if lp is not None else None}
    return {**head, "choices": [choice], "usage": usage_json(r["usage"])}


def _completion_logprobs(lps) -> dict:
    return {"tokens": [t for t, _, _ in lps], "token_logprobs": [lp for _, lp, _ in lps],
            "top_logprobs": [{a: alp for a, alp in top} for _, _, top in lps], "text_offset": []}


async def _completion_chunks(run, head: dict, include_usage: bool):
    async for d in run:
        if d.kind == "keepalive":
            yield None
        elif d.kind == "text" and d.text:
            lp = _completion_logprobs(d.logprobs) if d.logprobs else None
            yield {**head, "choices": [{"index": 0, "text": d.text, "finish_reason": None, "logprobs": lp}]}
        elif d.kind == "done":
            yield {**head, "choices": [{"index": 0, "text": "", "finish_reason": d.finish_reason, "logprobs": None}]}
            if include_usage:
                yield {**head, "choices": [], "usage": usage_json(d.usage)}
