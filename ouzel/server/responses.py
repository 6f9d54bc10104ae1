"""OpenAI Responses API (POST /v1/responses), stateless: `previous_response_id` is not kept."""
from __future__ import annotations

import json
import secrets
import time

from fastapi import APIRouter, Request

from . import params
from .app import check_model, read_body, sse
from .errors import ApiError, field
from .prompt import text_of

router = APIRouter()


def _messages(body: dict) -> list[dict]:
    """Responses input items -> chat messages (function calls become assistant tool_calls)."""
    msgs = []
    instructions = field(body, "instructions", str)
    if instructions:
        msgs.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        return msgs + [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise ApiError(400, "'input' must be a string or a non-empty array of items", param="input")
    for i, it in enumerate(items):
        if not isinstance(it, dict):
            raise ApiError(400, f"input[{i}] must be an object", param="input")
        kind = it.get("type", "message")
        if kind == "message":
            msgs.append({"role": it.get("role", "user"), "content": text_of(it.get("content"), f"input[{i}]")})
        elif kind == "function_call":
            call = {"id": it.get("call_id"), "type": "function",
                    "function": {"name": it.get("name"), "arguments": it.get("arguments", "{}")}}
            if msgs and msgs[-1]["role"] == "assistant" and msgs[-1].get("tool_calls"):
                msgs[-1]["tool_calls"].append(call)
            else:
                msgs.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            out = it.get("output")
            msgs.append({"role": "tool", "tool_call_id": it.get("call_id"),
                         "content": out if isinstance(out, str) else json.dumps(out)})
        else:
            raise ApiError(400, f"input[{i}]: unsupported item type {kind!r}", param="input")
    return msgs


def _tools(body: dict) -> list[dict]:
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise ApiError(400, "'tools' must be an array", param="tools")
    out = []
    for t in tools:
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("name"), str):
            raise ApiError(400, "only {'type': 'function', 'name': ...} tools are supported", param="tools")
        out.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters") if k in t}})
    return out


def _usage(u) -> dict:
    return {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": u.cached_tokens},
            "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.prompt_tokens + u.completion_tokens}


def _text_item(text: str, status="completed") -> dict:
    return {"type": "message", "id": "msg_" + secrets.token_hex(12), "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []}


def _call_item(call, status="completed") -> dict:
    return {"type": "function_call", "id": "fc_" + call.id, "call_id": call.id, "name": call.name,
            "arguments": call.arguments if status == "completed" else "", "status": status}


@router.post("/v1/responses")
async def responses(request: Request):
    engine = request.app.state.engine
    body = await read_body(request)
    check_model(engine, body)
    if body.get("previous_response_id"):
        raise ApiError(400, "previous_response_id is not supported: this server keeps no responses; send the "
                            "whole conversation in 'input' (its prefix is cached, so that is cheap)",
                       param="previous_response_id")
    tools = _tools(body)
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"function": {"name": choice.get("name")}}
    ids, forced, text = engine.chat.build(_messages(body), tools, choice)
    p = params.sampling(body, engine.ctx_left(ids), max_names=("max_output_tokens",))
    engine.validate(ids, p)
    use_tools = bool(tools) and choice != "none"
    kw = dict(tools=use_tools, forced=forced, text=text, is_disconnected=request.is_disconnected)
    head = {"id": "resp_" + secrets.token_hex(12), "object": "response", "created_at": int(time.time()),
            "model": engine.model_id, "tool_choice": choice or "auto", "tools": body.get("tools") or [],
            "parallel_tool_calls": True, "temperature": p.temperature, "top_p": p.top_p}
    if field(body, "stream", bool, False):
        run = engine.stream(ids, p, **kw)
        return sse(_events(run, head), run=run, named=True)
    r = await engine.collect(ids, p, **kw)
    output = ([_text_item(r["text"])] if r["text"] or not r["calls"] else []) + [_call_item(c) for c in r["calls"]]
    return {**head, "status": _status(r["finish_reason"]), "output": output, "usage": _usage(r["usage"]),
            "incomplete_details": {"reason": "max_output_tokens"} if r["finish_reason"] == "length" else None}


def _status(reason: str) -> str:
    return "incomplete" if reason == "length" else "completed"


async def _events(run, head: dict):
    seq = iter(range(1 << 30))

    def ev(kind: str, **kw) -> dict:
        return {"type": kind, "sequence_number": next(seq), **kw}

    yield ev("response.created", response={**head, "status": "in_progress", "output": []})
    yield ev("response.in_progress", response={**head, "status": "in_progress", "output": []})
    output, text_item, text, index = [], None, [], 0
    async for d in run:
        if d.kind == "keepalive":
            yield None
        elif d.kind == "text" and d.text:
            if text_item is None:
                text_item = _text_item("", "in_progress")
                yield ev("response.output_item.added", output_index=index, item=text_item)
                yield ev("response.content_part.added", item_id=text_item["id"], output_index=index, content_index=0,
                         part={"type": "output_text", "text": "", "annotations": []})
            text.append(d.text)
            yield ev("response.output_text.delta", item_id=text_item["id"], output_index=index, content_index=0,
                     delta=d.text, logprobs=[])
        elif d.kind == "call_start":
            if text_item is not None:
                for e in _close_text(ev, text_item, "".join(text), index):
                    yield e
                output.append({**text_item, "status": "completed",
                               "content": [{"type": "output_text", "text": "".join(text), "annotations": []}]})
                text_item, text, index = None, [], index + 1
            yield ev("response.output_item.added", output_index=index, item=_call_item(d.call, "in_progress"))
        elif d.kind == "call_done":
            item = _call_item(d.call)
            yield ev("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                     delta=d.call.arguments)
            yield ev("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                     arguments=d.call.arguments, name=d.call.name)
            yield ev("response.output_item.done", output_index=index, item=item)
            output.append(item)
            index += 1
        elif d.kind == "done":
            if text_item is not None:
                for e in _close_text(ev, text_item, "".join(text), index):
                    yield e
                output.append({**text_item, "status": "completed",
                               "content": [{"type": "output_text", "text": "".join(text), "annotations": []}]})
            status = _status(d.finish_reason)
            yield ev(f"response.{status}", response={**head, "status": status, "output": output,
                                                     "usage": _usage(d.usage)})


def _close_text(ev, item: dict, text: str, index: int) -> list[dict]:
    part = {"type": "output_text", "text": text, "annotations": []}
    return [ev("response.output_text.done", item_id=item["id"], output_index=index, content_index=0, text=text,
               logprobs=[]),
            ev("response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=part),
            ev("response.output_item.done", output_index=index,
               item={**item, "status": "completed", "content": [part]})]
