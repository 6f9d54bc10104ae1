"""Conversations from each API, normalised to chat-template messages, and tool-call replay.

All three APIs are turned into OpenAI-style messages ({"role", "content", "tool_calls"?,
"tool_call_id"?}); `ChatPrompt.build` renders them through the model's chat template.
"""
from __future__ import annotations

import collections
import json
import threading
from dataclasses import dataclass, field

from ..errors import OuzelError
from ..text.chat import encode_chat_prompt
from ..text.reasoning import thinks
from ..text.tool_formats import ToolFormat, format_for
from .errors import ApiError


@dataclass
class Sampled:
    raw: str                      # the assistant text exactly as sampled (forced prefix included)
    history_text: str = ""        # the whole prompt text up to and including raw ...
    history_ids: list[int] = field(default_factory=list)  # ... and the token ids the model saw for it


class ToolReplay:
    """tool-call id -> what we sampled for it (bounded, oldest dropped).

    Clients resend tool calls as JSON; replay the sampled text so the KV prefix still matches,
    and reuse the sampled token ids too: re-tokenizing model output need not give the same ids."""

    def __init__(self, limit: int = 4096):
        self._items: collections.OrderedDict[str, Sampled] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.limit, self.hits = limit, 0

    def remember(self, call_ids: list[str], sampled: Sampled) -> None:
        with self._lock:
            for i in call_ids:
                self._items[i] = sampled
            while len(self._items) > self.limit:
                self._items.popitem(last=False)

    def get(self, call_id: str | None) -> Sampled | None:
        with self._lock:
            item = self._items.get(call_id or "")
            if item is not None:
                self.hits += 1
            return item


def text_of(content, where: str) -> str:
    """Plain text of a message content: a string, or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                out.append(part["text"])
            elif isinstance(part, dict) and part.get("type") in ("image_url", "image", "input_image"):
                raise ApiError(400, f"{where}: images are not supported by this model")
            else:
                raise ApiError(400, f"{where}: unsupported content part {str(part)[:80]}")
        return "".join(out)
    raise ApiError(400, f"{where}: content must be a string or an array of parts")


def openai_tools(tools) -> list[dict]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ApiError(400, "'tools' must be an array", param="tools")
    out = []
    for t in tools:
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ApiError(400, "each tool must be {'type': 'function', 'function': {'name': ...}}", param="tools")
        out.append({"type": "function", "function": fn})
    return out


class ChatPrompt:
    def __init__(self, llm, replay: ToolReplay):
        self.llm, self.replay = llm, replay
        self.template = llm.chat_template
        self.format: ToolFormat = format_for(self.template.source)
        src = self.template.source
        self.template_tools = "tools" in src
        self.template_tool_calls = "tool_calls" in src
        self.thinks = thinks(src, llm.tokenizer)  # replies are split into reasoning and answer
        self._history: Sampled | None = None  # set by _message while build() runs (no await inside)

    def build(self, messages: list[dict], tools: list[dict], tool_choice,
              template_vars: dict | None = None) -> tuple[list[int], str, str]:
        """Prompt ids, the forced prefix (text the reply is taken to start with) and the prompt text.
        template_vars: extra chat-template variables (enable_thinking, chat_template_kwargs, ...)."""
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty array", param="messages")
        self._history = None
        msgs = [self._message(m, i) for i, m in enumerate(messages)]
        history, self._history = self._history, None
        use_tools = bool(tools) and tool_choice != "none"
        if use_tools and not self.template_tools:
            note = self.format.system_prompt([t["function"] for t in tools])
            if msgs[0]["role"] == "system":
                msgs[0] = {**msgs[0], "content": msgs[0]["content"] + "\n\n" + note}
            else:
                msgs.insert(0, {"role": "system", "content": note})
        try:
            text = self.template.render(msgs, add_generation_prompt=True,
                                        tools=tools if use_tools and self.template_tools else None,
                                        **(template_vars or {}))
        except OuzelError as e:
            raise ApiError(400, str(e)) from None
        forced = ""
        if use_tools and tool_choice not in (None, "auto"):
            name = None
            if isinstance(tool_choice, dict):
                name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
            elif tool_choice != "required":
                raise ApiError(400, f"unknown tool_choice {tool_choice!r}", param="tool_choice")
            forced = self.format.forced_prefix(name)
        full = text + forced
        if history is not None and history.history_ids and full.startswith(history.history_text):
            # the turns up to the replayed call as the model saw them, then the rest encoded
            rest = self.llm.tokenizer.encode(full[len(history.history_text):], add_special=False, parse_special=True)
            return history.history_ids + rest, forced, full
        return encode_chat_prompt(self.llm.tokenizer, full), forced, full

    def _message(self, m, i: int) -> dict:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a 'role'", param="messages")
        role = m["role"]
        if role == "developer":
            role = "system"
        content = text_of(m.get("content"), f"messages[{i}]")
        reasoning = m.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise ApiError(400, f"messages[{i}].reasoning_content must be a string", param="messages")
        calls = m.get("tool_calls")
        if role == "assistant" and calls:
            sampled = self.replay.get(calls[0].get("id") if isinstance(calls[0], dict) else None)
            if sampled is not None:
                self._history = sampled  # the latest replayed call covers every turn before it
                return {"role": "assistant", "content": sampled.raw}
            parsed = []
            for c in calls:
                fn = (c or {}).get("function") or {}
                args = fn.get("arguments") or "{}"
                try:
                    args = json.loads(args) if isinstance(args, str) else args
                except ValueError:
                    raise ApiError(400, f"messages[{i}]: tool call arguments are not JSON") from None
                parsed.append((fn.get("name", ""), args))
            if self.template_tool_calls:
                out = {"role": "assistant", "content": content,
                       "tool_calls": [{"type": "function", "id": c.get("id"),
                                       "function": {"name": n, "arguments": a}} for c, (n, a) in zip(calls, parsed)]}
            else:
                out = {"role": "assistant", "content": content + self.format.render(parsed)}
            if reasoning:
                out["reasoning_content"] = reasoning
            return out
        out = {"role": role, "content": content}
        if role == "assistant" and reasoning:
            out["reasoning_content"] = reasoning  # templates that keep the thought (Qwen3) render it
        if role == "tool" and m.get("tool_call_id"):
            out["tool_call_id"] = m["tool_call_id"]
        return out
