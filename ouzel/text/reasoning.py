"""Reasoning ("thinking") in model output: `<think> ... </think>` before the answer (Qwen3,
DeepSeek R1/V3.1+, SmolLM3, ...), split from the answer as it streams.

Some templates write the opening `<think>` into the prompt, so the reply starts inside the
thought and only contains `</think>`; `opens_thought(prompt)` tells. A reply that does not start
with `<think>` (and did not start inside one) passes through unchanged.
"""
from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def thinks(template_source: str, tokenizer=None) -> bool:
    """A thinking model: its chat template mentions <think>, or its vocabulary has both tags."""
    if OPEN in (template_source or ""):
        return True
    lookup = getattr(tokenizer, "token_to_id", None)
    return lookup is not None and lookup(OPEN) is not None and lookup(CLOSE) is not None


def opens_thought(prompt: str) -> bool:
    """The rendered prompt ends inside an open <think> (the reply continues the thought)."""
    return prompt.rstrip().endswith(OPEN)


def _partial_close(text: str) -> int:
    """How many trailing characters could be the beginning of CLOSE."""
    for k in range(min(len(CLOSE) - 1, len(text)), 0, -1):
        if CLOSE.startswith(text[-k:]):
            return k
    return 0


class ReasoningStream:
    """push(text) -> [("reasoning", str) | ("text", str)], the same whatever the chunking.

    Whitespace around the thought and at the start of the answer is dropped (the template wrote
    it, not the model's meaning); text that might be a tag's beginning is held back until it is
    clearly not one. A reply cut off inside the thought is all reasoning."""

    def __init__(self, inside: bool = False):
        self.state = "think" if inside else "start"  # start | think | answer
        self.buf = ""
        self.lead = True  # strip leading whitespace of the current part

    def push(self, text: str, final: bool = False) -> list[tuple[str, str]]:
        self.buf += text
        out: list[tuple[str, str]] = []
        while True:
            if self.state == "start":
                s = self.buf.lstrip()
                if s.startswith(OPEN):
                    self.buf, self.state = s[len(OPEN):], "think"
                    continue
                if not final and OPEN.startswith(s):
                    return out  # nothing yet, or a prefix of <think>
                self.state, self.lead = "answer", False  # not a thought: pass through unchanged
            if self.lead:
                self.buf = self.buf.lstrip()
                if not self.buf:
                    return out
                self.lead = False
            if self.state == "answer":
                if self.buf:
                    out.append(("text", self.buf))
                self.buf = ""
                return out
            i = self.buf.find(CLOSE)
            if i >= 0:
                if self.buf[:i].rstrip():
                    out.append(("reasoning", self.buf[:i].rstrip()))
                self.buf, self.state, self.lead = self.buf[i + len(CLOSE):], "answer", True
                continue
            emit = self.buf.rstrip() if final else self.buf[:len(self.buf) - _partial_close(self.buf)].rstrip()
            if emit:
                out.append(("reasoning", emit))
            self.buf = "" if final else self.buf[len(emit):]
            return out

    def finish(self) -> list[tuple[str, str]]:
        return self.push("", final=True)


def reply_events(split: ReasoningStream | None, parser, text: str, final: bool = False) -> list[tuple]:
    """Model text through the reasoning splitter, then the answer part through the tool-call
    parser (`ToolStream`, or None): ("reasoning" | "text", str), ("call_start" | "call_done", ToolCall)."""
    parts = split.push(text, final) if split is not None else [("text", text)]
    out: list[tuple] = []
    for kind, s in parts:
        if kind == "text" and parser is not None:
            out += parser.push(s)
        else:
            out.append((kind, s))
    if final and parser is not None:
        out += parser.finish()
    return out


def split_reasoning(text: str, inside: bool = False) -> tuple[str, str]:
    """Non-streaming: (reasoning, answer) of a whole reply."""
    events = ReasoningStream(inside).push(text, final=True)
    return ("".join(s for k, s in events if k == "reasoning"), "".join(s for k, s in events if k == "text"))
