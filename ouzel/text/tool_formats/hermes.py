"""Qwen / Hermes: <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>, one block per call."""
from __future__ import annotations

import json
import re

from .base import ToolFormat, loads_object

_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')


class Hermes(ToolFormat):
    name = "hermes"
    start = "<tool_call>"
    end = "</tool_call>"

    def name_of(self, call_text: str) -> str | None:
        m = _NAME.search(call_text)
        return json.loads(f'"{m.group(1)}"') if m else None

    def end_of(self, call_text: str, final: bool) -> int | None:
        i = call_text.find(self.end)
        if i >= 0:
            return i + len(self.end)
        if final:  # the reply ended inside the call (e.g. a stop string ate the close tag)
            body = call_text[len(self.start):]
            lead = len(body) - len(body.lstrip())
            try:
                _, j = json.JSONDecoder().raw_decode(body, lead)
            except ValueError:
                return None
            return len(self.start) + j
        return None

    def parse(self, block: str) -> list[tuple[str, dict]]:
        body = block[len(self.start):]
        body = (body[:-len(self.end)] if body.endswith(self.end) else body).strip()
        obj = loads_object(body)
        for close in ("}", "}}"):  # small models often drop the outer brace after nested arguments
            obj = obj if obj is not None else loads_object(body + close)
        if obj is None or not isinstance(obj.get("name"), str):
            return []
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            args = loads_object(args) or {}
        return [(obj["name"], args if isinstance(args, dict) else {})]

    def render(self, calls: list[tuple[str, dict]]) -> str:
        return "\n".join(f'{self.start}\n{json.dumps({"name": n, "arguments": a}, ensure_ascii=False)}\n{self.end}'
                         for n, a in calls)

    def forced_prefix(self, name: str | None) -> str:
        return f'{self.start}\n{{"name": "' + (f'{name}", "arguments":' if name else "")
