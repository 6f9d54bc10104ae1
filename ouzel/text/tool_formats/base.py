"""The interface every tool-call format implements."""
from __future__ import annotations

import json


class ToolFormat:
    name = "base"
    start = ""  # the text that opens a call (formats with a marker)

    def find_start(self, text: str, at_start: bool) -> int | None:
        """Index in text where a tool call begins, or None. at_start: nothing but whitespace has
        been emitted before text (some formats only call tools at the start of a reply)."""
        i = text.find(self.start)
        return i if i >= 0 else None

    def hold_back(self, text: str, at_start: bool) -> int:
        """How many trailing characters could be the beginning of a call's opening."""
        for k in range(min(len(self.start) - 1, len(text)), 0, -1):
            if self.start.startswith(text[-k:]):
                return k
        return 0

    def name_of(self, call_text: str) -> str | None:
        raise NotImplementedError

    def end_of(self, call_text: str, final: bool) -> int | None:
        """Index just past the complete call block in call_text, or None if not complete yet."""
        raise NotImplementedError

    def parse(self, block: str) -> list[tuple[str, dict]]:
        """(name, arguments) of every call in a complete block; [] if it is not a valid call."""
        raise NotImplementedError

    def render(self, calls: list[tuple[str, dict]]) -> str:
        """Native text of calls (when we have no sampled text to replay)."""
        raise NotImplementedError

    def forced_prefix(self, name: str | None) -> str:
        """Text that, appended to the prompt, makes the model continue inside a call."""
        raise NotImplementedError

    def system_prompt(self, tools: list[dict]) -> str:
        """Tool instructions for chat templates that cannot render tools themselves."""
        schemas = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        return ("You may call functions. The available functions, as JSON schemas:\n" + schemas +
                "\nTo call a function reply with:\n" + self.render([("function_name", {"arg": "value"})]))


def loads_object(text: str) -> dict | None:
    try:
        obj = json.loads(text)
    except (ValueError, TypeError):
        return None
    return obj if isinstance(obj, dict) else None
