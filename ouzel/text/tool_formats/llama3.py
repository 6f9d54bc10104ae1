"""Llama 3.x JSON tool calls: the reply is {"name": ..., "parameters": {...}} (optionally after
<|python_tag|>, several calls separated by ';'). Only a reply that starts with one is a call."""
from __future__ import annotations

import json
import re

from .base import ToolFormat

_NAME = re.compile(r'^\s*(?:<\|python_tag\|>)?\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_TAG = "<|python_tag|>"


class Llama3(ToolFormat):
    name = "llama3"

    def find_start(self, text: str, at_start: bool) -> int | None:
        if not at_start:
            return None
        s = text.lstrip()
        if s.startswith(_TAG) or s.startswith("{"):
            return 0
        return None

    def hold_back(self, text: str, at_start: bool) -> int:
        s = text.lstrip()
        return len(text) if at_start and (not s or _TAG.startswith(s)) else 0

    def name_of(self, call_text: str) -> str | None:
        m = _NAME.match(call_text)
        return json.loads(f'"{m.group(1)}"') if m else None

    def end_of(self, call_text: str, final: bool) -> int | None:
        # the whole reply is the call: only complete at the end, when it parses
        return len(call_text) if final else None

    def parse(self, block: str) -> list[tuple[str, dict]]:
        s = block.strip()
        if s.startswith(_TAG):
            s = s[len(_TAG):].strip()
        calls, dec, i = [], json.JSONDecoder(), 0
        while i < len(s):
            try:
                obj, i = dec.raw_decode(s, i)
            except ValueError:
                return []
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                return []
            args = obj.get("parameters", obj.get("arguments", {}))
            calls.append((obj["name"], args if isinstance(args, dict) else {}))
            while i < len(s) and s[i] in " \n\t;":
                i += 1
        return calls

    def render(self, calls: list[tuple[str, dict]]) -> str:
        return "; ".join(json.dumps({"name": n, "parameters": a}, ensure_ascii=False) for n, a in calls)

    def forced_prefix(self, name: str | None) -> str:
        return '{"name": "' + (f'{name}", "parameters":' if name else "")
