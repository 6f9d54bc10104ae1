"""Tool-call formats: how a model family writes tool calls in text, and how to read them back.

A format knows where a call starts, when its name is known, where the calls end, how to parse
them into (name, arguments) and how to write calls in its native text (for conversations whose
tool calls we did not sample ourselves). `ToolStream` drives any format over streamed text.
"""
from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from .base import ToolFormat
from .dsml import DSML
from .hermes import Hermes
from .llama3 import Llama3

FORMATS: dict[str, ToolFormat] = {"hermes": Hermes(), "llama3": Llama3(), "dsml": DSML()}


def format_for(template_source: str) -> ToolFormat:
    """The tool format a chat template speaks; Hermes for templates that know no tools at all
    (the tool schemas then go into a system message, see `ToolFormat.system_prompt`)."""
    src = template_source or ""
    if "DSML" in src:
        return FORMATS["dsml"]
    if "<|python_tag|>" in src or "ipython" in src:
        return FORMATS["llama3"]
    return FORMATS["hermes"]


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text

    @staticmethod
    def new(name: str, arguments: dict | str) -> "ToolCall":
        args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        return ToolCall("call_" + secrets.token_hex(12), name, args)


class ToolStream:
    """Splits streamed model text into plain text and tool calls.

    push(text) returns a list of events: ("text", str), ("call_start", ToolCall) as soon as a
    call's name is known, ("call_done", ToolCall) with its arguments. Text that might be the start
    of a call is held back until it is clearly not."""

    def __init__(self, fmt: ToolFormat, prefix: str = ""):
        self.fmt = fmt
        self.buf = ""        # text not yet emitted
        self.in_call = False
        self.started: list[ToolCall] = []
        self.calls: list[ToolCall] = []
        self.raw = ""        # every character seen, for replay
        self.at_start = True
        if prefix:
            self.events = self.push(prefix)
        else:
            self.events = []

    def push(self, text: str, final: bool = False) -> list[tuple]:
        self.raw += text
        self.buf += text
        out: list[tuple] = []
        while True:
            if not self.in_call:
                i = self.fmt.find_start(self.buf, self.at_start)
                if i is None:
                    keep = 0 if final else self.fmt.hold_back(self.buf, self.at_start)
                    emit = self.buf[:len(self.buf) - keep]
                    if emit:
                        out.append(("text", emit))
                        self.at_start = self.at_start and not emit.strip()
                    self.buf = self.buf[len(emit):]
                    return out
                if self.buf[:i]:
                    out.append(("text", self.buf[:i]))
                self.buf, self.in_call = self.buf[i:], True
            name = self.fmt.name_of(self.buf)
            if name is not None and len(self.started) == len(self.calls):
                call = ToolCall.new(name, "{}")
                self.started.append(call)
                out.append(("call_start", call))
            end = self.fmt.end_of(self.buf, final)
            if end is None:
                if final and self.buf:  # an unfinished call: give it back as text
                    out.append(("text", self.buf))
                    self.buf = ""
                return out
            parsed = self.fmt.parse(self.buf[:end])
            for j, (n, args) in enumerate(parsed):
                if j < len(self.started) - len(self.calls):
                    call = self.started[len(self.calls)]
                    call.name = n
                else:
                    call = ToolCall.new(n, "{}")
                    self.started.append(call)
                    out.append(("call_start", call))
                call.arguments = json.dumps(args, ensure_ascii=False)
                self.calls.append(call)
                out.append(("call_done", call))
            if not parsed:  # it looked like a call but is not one: plain text after all
                out.append(("text", self.buf[:end]))
            self.started = self.started[:len(self.calls)]
            self.buf, self.in_call, self.at_start = self.buf[end:], False, False

    def finish(self) -> list[tuple]:
        return self.push("", final=True)


def parse_tool_calls(text: str, fmt: ToolFormat) -> tuple[str, list[ToolCall]]:
    """Non-streaming: (plain text, calls) of a whole reply."""
    s = ToolStream(fmt)
    events = s.push(text) + s.finish()
    return "".join(e[1] for e in events if e[0] == "text"), s.calls


__all__ = ["FORMATS", "ToolCall", "ToolFormat", "ToolStream", "format_for", "parse_tool_calls"]
