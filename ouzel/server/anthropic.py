"""Anthropic Messages API (POST /v1/messages)."""
from __future__ import annotations

import json
import secrets

from fastapi import APIRouter, Request

from . import params
from .app import check_model, read_body, sse
from .errors import ApiError, field
from .prompt import text_of

router = APIRouter()
STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "cancelled": "end_turn"}


def _messages(body: dict) -> list[dict]:
    """Anthropic content blocks -> chat messages: tool_use -> assistant tool_calls, tool_result -> tool."""
    msgs = []
    system = body.get("system")
    if system is not None:
        msgs.append({"role": "system", "content": text_of(system, "system")})
    items = body.get("messages")
    if not isinstance(items, list) or not items:
        raise ApiError(400, "'messages' must be a non-empty array", param="messages")
    for i, m in enumerate(items):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise ApiError(400, f"messages[{i}].role must be 'user' or 'assistant'", param="messages")
        content = m.get("content")
        if isinstance(content, str):
            msgs.append({"role": m["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise ApiError(400, f"messages[{i}].content must be a string or an array of blocks", param="messages")
        text, calls, thought = [], [], []
        for b in content:
            kind = b.get("type") if isinstance(b, dict) else None
            if kind == "text":
                text.append(b.get("text", ""))
            elif kind == "tool_use":
                calls.append({"id": b.get("id"), "type": "function",
                              "function": {"name": b.get("name"), "arguments": json.dumps(b.get("input", {}))}})
            elif kind == "tool_result":
                c = b.get("content")
                msgs.append({"role": "tool", "tool_call_id": b.get("tool_use_id"),
                             "content": text_of(c, f"messages[{i}] tool_result") if c is not None else ""})
            elif kind == "thinking":
                if not isinstance(b.get("thinking", ""), str):
                    raise ApiError(400, f"messages[{i}]: a thinking block's 'thinking' must be a string",
                                   param="messages")
                thought.append(b.get("thinking", ""))
            elif kind == "redacted_thinking":
                continue
            else:
                raise ApiError(400, f"messages[{i}]: unsupported content block {kind!r}", param="messages")
        if text or calls:
            msg = {"role": m["role"], "content": "".join(text)}
            if calls:
                msg["tool_calls"] = calls
            if thought and m["role"] == "assistant":
                msg["reasoning_content"] = "".join(thought)
            msgs.append(msg)
    return msgs


def _tools(body: dict) -> tuple[list[dict], object]:
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise ApiError(400, "'tools' must be an array", param="tools")
    out = []
    for t in tools:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise ApiError(400, "each tool needs a 'name'", param="tools")
        out.append({"type": "function", "function": {"name": t["name"], "description": t.get("description", ""),
                                                       "parameters": t.get("input_schema", {})}})
    choice = body.get("tool_choice") or {}
    kind = choice.get("type") if isinstance(choice, dict) else None
    mapped = {"auto": "auto", "any": "required", "none": "none", None: None}.get(kind)
    if kind == "tool":
        mapped = {"function": {"name": choice.get("name")}}
    return out, mapped


def _usage(u) -> dict:
    # Anthropic counts cache reads apart from input_tokens
    return {"input_tokens": u.prompt_tokens - u.cached_tokens, "output_tokens": u.completion_tokens,
            "cache_read_input_tokens": u.cached_tokens, "cache_creation_input_tokens": 0}


def _tool_block(call) -> dict:
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": json.loads(call.arguments or "{}")}


@router.post("/v1/messages")
async def messages(request: Request):
    engine = request.app.state.engine
    body = await read_body(request)
    check_model(engine, body)
    max_tokens = field(body, "max_tokens", int, required=True)
    tools, choice = _tools(body)
    ids, forced, text = engine.chat.build(_messages(body), tools, choice, params.anthropic_thinking(body, max_tokens))
    p = params.sampling(body, engine.ctx_left(ids), stop_name="stop_sequences")
    engine.validate(ids, p)
    use_tools = bool(tools) and choice != "none"
    kw = dict(tools=use_tools, forced=forced, text=text, reasoning=True, is_disconnected=request.is_disconnected)
    head = {"id": "msg_" + secrets.token_hex(12), "type": "message", "role": "assistant", "model": engine.model_id}
    if field(body, "stream", bool, False):
        run = engine.stream(ids, p, **kw)
        return sse(_events(run, head, len(ids)), run=run, named=True)
    r = await engine.collect(ids, p, **kw)
    content = ([_thinking_block(r["reasoning"])] if r["reasoning"] else []) + \
        ([{"type": "text", "text": r["text"]}] if r["text"] else []) + [_tool_block(c) for c in r["calls"]]
    return {**head, "content": content, "stop_reason": _stop_reason(r["finish_reason"], r["stop_sequence"]),
            "stop_sequence": r["stop_sequence"], "usage": _usage(r["usage"])}


def _thinking_block(text: str) -> dict:
    # no signature: the thought is not verified when a client sends it back
    return {"type": "thinking", "thinking": text, "signature": ""}


def _stop_reason(reason: str, stop_sequence: str | None) -> str:
    return "stop_sequence" if stop_sequence else STOP.get(reason, "end_turn")


async def _events(run, head: dict, n_prompt: int):
    yield {"type": "message_start", "message": {**head, "content": [], "stop_reason": None, "stop_sequence": None,
                                                "usage": {"input_tokens": n_prompt, "output_tokens": 0}}}
    index, open_block = 0, None  # the kind ("thinking" | "text") of the open content block
    async for d in run:
        if d.kind == "keepalive":
            yield {"type": "ping"}
        elif d.kind in ("text", "reasoning") and d.text:
            kind = "text" if d.kind == "text" else "thinking"
            if open_block != kind:
                if open_block is not None:
                    yield {"type": "content_block_stop", "index": index}
                    index += 1
                block = {"type": "text", "text": ""} if kind == "text" else _thinking_block("")
                yield {"type": "content_block_start", "index": index, "content_block": block}
                open_block = kind
            delta = {"type": "text_delta", "text": d.text} if kind == "text" else \
                {"type": "thinking_delta", "thinking": d.text}
            yield {"type": "content_block_delta", "index": index, "delta": delta}
        elif d.kind == "call_start":
            if open_block is not None:
                yield {"type": "content_block_stop", "index": index}
                index, open_block = index + 1, None
            yield {"type": "content_block_start", "index": index,
                   "content_block": {"type": "tool_use", "id": d.call.id, "name": d.call.name, "input": {}}}
        elif d.kind == "call_done":
            yield {"type": "content_block_delta", "index": index,
                   "delta": {"type": "input_json_delta", "partial_json": d.call.arguments}}
            yield {"type": "content_block_stop", "index": index}
            index += 1
        elif d.kind == "done":
            if open_block is not None:
                yield {"type": "content_block_stop", "index": index}
            yield {"type": "message_delta", "delta": {"stop_reason": _stop_reason(d.finish_reason, d.stop_sequence),
                                                      "stop_sequence": d.stop_sequence}, "usage": _usage(d.usage)}
            yield {"type": "message_stop"}
