"""OpenAI Responses API (POST /v1/responses). Finished responses are kept in memory (bounded) for
`previous_response_id`: a request naming one continues that conversation."""
from __future__ import annotations

import collections
import functools
import json
import secrets
import time

from fastapi import APIRouter, Request

from . import params
from .app import check_model, read_body, sse
from .errors import ApiError, field
from .prompt import text_of

router = APIRouter()


class ResponseStore:
    """Response id -> its conversation (input items, previous turns included, then output items).

    Least recently used dropped past `limit`; in memory only, so a restart forgets them. Used
    from the event loop only: no lock."""

    def __init__(self, limit: int = 256):
        self._items: collections.OrderedDict[str, list[dict]] = collections.OrderedDict()
        self.limit = limit

    def put(self, response_id: str, items: list[dict], output: list[dict]) -> None:
        self._items[response_id] = items + output
        while len(self._items) > self.limit:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> list[dict] | None:
        items = self._items.get(response_id)
        if items is not None:
            self._items.move_to_end(response_id)
        return items


def _input_items(body: dict, store: ResponseStore) -> tuple[list[dict], int]:
    """The conversation's items: the previous response's (if named), then this request's `input`;
    and how many came from the previous response."""
    items = body.get("input")
    if isinstance(items, str):
        items = [{"type": "message", "role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise ApiError(400, "'input' must be a string or a non-empty array of items", param="input")
    previous_id = field(body, "previous_response_id", str)
    if not previous_id:
        return items, 0
    previous = store.get(previous_id)
    if previous is None:
        raise ApiError(404, f"Previous response with id '{previous_id}' not found.", param="previous_response_id",
                       code="previous_response_not_found")
    return previous + items, len(previous)


def _messages(instructions: str | None, items: list[dict], skip: int) -> list[dict]:
    """Responses input items -> chat messages (function calls become assistant tool_calls). The
    first `skip` items were checked when their response was made; errors name this request's items."""
    msgs, thought = [], None  # a reasoning item goes with the assistant turn after it
    if instructions:
        msgs.append({"role": "system", "content": instructions})
    for i, it in enumerate(items):
        where = f"input[{i - skip}]"
        if not isinstance(it, dict):
            raise ApiError(400, f"{where} must be an object", param="input")
        kind = it.get("type", "message")
        if kind == "message":
            msgs.append({"role": it.get("role", "user"), "content": text_of(it.get("content"), where)})
            if thought is not None and msgs[-1]["role"] == "assistant":
                msgs[-1]["reasoning_content"] = thought
            thought = None
        elif kind == "reasoning":
            thought = text_of(it.get("content") or it.get("summary"), where) or None
        elif kind == "function_call":
            call = {"id": it.get("call_id"), "type": "function",
                    "function": {"name": it.get("name"), "arguments": it.get("arguments", "{}")}}
            if msgs and msgs[-1]["role"] == "assistant" and msgs[-1].get("tool_calls"):
                msgs[-1]["tool_calls"].append(call)
            else:
                msgs.append({"role": "assistant", "content": "", "tool_calls": [call]})
                if thought is not None:
                    msgs[-1]["reasoning_content"] = thought
            thought = None
        elif kind == "function_call_output":
            out = it.get("output")
            msgs.append({"role": "tool", "tool_call_id": it.get("call_id"),
                         "content": out if isinstance(out, str) else json.dumps(out)})
        else:
            raise ApiError(400, f"{where}: unsupported item type {kind!r}", param="input")
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
    details = {"cached_tokens": u.cached_tokens, "cache_write_tokens": 0}
    return {"input_tokens": u.prompt_tokens, "input_tokens_details": details,
            "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.prompt_tokens + u.completion_tokens}


def _text_item(text: str, status="completed") -> dict:
    return {"type": "message", "id": "msg_" + secrets.token_hex(12), "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []}


def _reasoning_item(text: str, summary: str | None, status="completed", item_id: str = "") -> dict:
    """The thought as reasoning_text content (gpt-oss style); also as the summary when one was asked
    for (the model writes no separate summary)."""
    done = status == "completed"
    return {"type": "reasoning", "id": item_id or "rs_" + secrets.token_hex(12), "status": status,
            "summary": [{"type": "summary_text", "text": text}] if summary is not None and done else [],
            "content": [{"type": "reasoning_text", "text": text}] if done else []}


def _call_item(call, status="completed") -> dict:
    return {"type": "function_call", "id": "fc_" + call.id, "call_id": call.id, "name": call.name,
            "arguments": call.arguments if status == "completed" else "", "status": status}


@router.post("/v1/responses")
async def responses(request: Request):
    engine, store = request.app.state.engine, request.app.state.responses
    body = await read_body(request)
    check_model(engine, body)
    items, skip = _input_items(body, store)
    tools = _tools(body)
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"function": {"name": choice.get("name")}}
    msgs = _messages(field(body, "instructions", str), items, skip)
    template_vars, summary = params.responses_reasoning(body)  # summary: None when not asked for
    ids, forced, text = engine.chat.build(msgs, tools, choice, template_vars)
    p = params.sampling(body, engine.ctx_left(ids), max_names=("max_output_tokens",))
    engine.validate(ids, p)
    use_tools = bool(tools) and choice != "none"
    kw = dict(tools=use_tools, forced=forced, text=text, reasoning=True, is_disconnected=request.is_disconnected)
    keep = field(body, "store", bool, True)
    head = {"id": "resp_" + secrets.token_hex(12), "object": "response", "created_at": int(time.time()),
            "model": engine.model_id, "tool_choice": choice or "auto", "tools": body.get("tools") or [],
            "parallel_tool_calls": True, "temperature": p.temperature, "top_p": p.top_p,
            "previous_response_id": body.get("previous_response_id"), "store": keep,
            "reasoning": {"effort": (body.get("reasoning") or {}).get("effort"), "summary": summary}}
    # a finished response is kept (unless store: false) for a later previous_response_id
    save = functools.partial(store.put, head["id"], items) if keep else lambda output: None
    if field(body, "stream", bool, False):
        run = engine.stream(ids, p, **kw)
        return sse(_events(run, head, save, summary), run=run, named=True)
    r = await engine.collect(ids, p, **kw)
    output = ([_reasoning_item(r["reasoning"], summary)] if r["reasoning"] else []) + \
        ([_text_item(r["text"])] if r["text"] or not r["calls"] else []) + [_call_item(c) for c in r["calls"]]
    save(output)
    return {**head, "status": _status(r["finish_reason"]), "output": output, "usage": _usage(r["usage"]),
            "incomplete_details": {"reason": "max_output_tokens"} if r["finish_reason"] == "length" else None}


def _status(reason: str) -> str:
    return "incomplete" if reason == "length" else "completed"


async def _events(run, head: dict, save, summary: str | None):
    seq = iter(range(1 << 30))

    def ev(kind: str, **kw) -> dict:
        return {"type": kind, "sequence_number": next(seq), **kw}

    yield ev("response.created", response={**head, "status": "in_progress", "output": []})
    yield ev("response.in_progress", response={**head, "status": "in_progress", "output": []})
    output, text_item, text, index = [], None, [], 0
    thought = _Thought(ev, summary)
    async for d in run:
        if d.kind == "keepalive":
            yield None
        elif d.kind == "reasoning" and d.text:
            for e in thought.delta(d.text, index):
                yield e
        elif d.kind in ("text", "call_start", "done") and thought.item is not None:
            for e in thought.close(index):  # the answer follows the thought
                yield e
            output.append(thought.done_item)
            index += 1
        if d.kind == "text" and d.text:
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
            save(output)
            yield ev(f"response.{status}", response={**head, "status": status, "output": output,
                                                     "usage": _usage(d.usage)})


def _close_text(ev, item: dict, text: str, index: int) -> list[dict]:
    part = {"type": "output_text", "text": text, "annotations": []}
    return [ev("response.output_text.done", item_id=item["id"], output_index=index, content_index=0, text=text,
               logprobs=[]),
            ev("response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=part),
            ev("response.output_item.done", output_index=index,
               item={**item, "status": "completed", "content": [part]})]


class _Thought:
    """The streamed reasoning item: reasoning_text events, plus summary_text events when a summary
    was asked for."""

    def __init__(self, ev, summary: str | None):
        self.ev, self.summary = ev, summary  # "auto" | "concise" | "detailed" | None
        self.item, self.text = None, []

    def delta(self, text: str, index: int) -> list[dict]:
        ev, out = self.ev, []
        if self.item is None:
            self.item = _reasoning_item("", None, "in_progress")
            out.append(ev("response.output_item.added", output_index=index, item=self.item))
            if self.summary:
                out.append(ev("response.reasoning_summary_part.added", item_id=self.item["id"], output_index=index,
                              summary_index=0, part={"type": "summary_text", "text": ""}))
        self.text.append(text)
        out.append(ev("response.reasoning_text.delta", item_id=self.item["id"], output_index=index, content_index=0,
                      delta=text))
        if self.summary:
            out.append(ev("response.reasoning_summary_text.delta", item_id=self.item["id"], output_index=index,
                          summary_index=0, delta=text))
        return out

    def close(self, index: int) -> list[dict]:
        ev, text, item_id = self.ev, "".join(self.text), self.item["id"]
        self.done_item = _reasoning_item(text, self.summary, item_id=item_id)
        out = [ev("response.reasoning_text.done", item_id=item_id, output_index=index, content_index=0, text=text)]
        if self.summary:
            out += [ev("response.reasoning_summary_text.done", item_id=item_id, output_index=index, summary_index=0,
                       text=text),
                    ev("response.reasoning_summary_part.done", item_id=item_id, output_index=index, summary_index=0,
                       part={"type": "summary_text", "text": text})]
        out.append(ev("response.output_item.done", output_index=index, item=self.done_item))
        self.item, self.text = None, []
        return out
