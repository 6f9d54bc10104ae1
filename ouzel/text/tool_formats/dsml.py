"""DeepSeek DSML (V3.2 / V4): XML-like tags with the fullwidth-bar DSML token.

<｜DSML｜function_calls>
<｜DSML｜invoke name="get_weather">
<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>
<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>
</｜DSML｜invoke>
</｜DSML｜function_calls>

string="true" values are raw text; string="false" values are JSON.
"""
from __future__ import annotations

import json
import re

from .base import ToolFormat

T = "｜DSML｜"
_INVOKE = re.compile(rf'<{T}invoke name="([^"]*)">(.*?)</{T}invoke>', re.S)
_PARAM = re.compile(rf'<{T}parameter name="([^"]*)" string="(true|false)">(.*?)</{T}parameter>', re.S)
_NAME = re.compile(rf'<{T}invoke name="([^"]*)">')


class DSML(ToolFormat):
    name = "dsml"
    start = f"<{T}function_calls>"
    end = f"</{T}function_calls>"

    def name_of(self, call_text: str) -> str | None:
        m = _NAME.search(call_text)
        return m.group(1) if m else None

    def end_of(self, call_text: str, final: bool) -> int | None:
        i = call_text.find(self.end)
        return i + len(self.end) if i >= 0 else None

    def parse(self, block: str) -> list[tuple[str, dict]]:
        calls = []
        for name, body in _INVOKE.findall(block):
            args = {}
            for key, is_str, value in _PARAM.findall(body):
                if is_str == "true":
                    args[key] = value
                else:
                    try:
                        args[key] = json.loads(value)
                    except ValueError:
                        args[key] = value
            calls.append((name, args))
        return calls

    def render(self, calls: list[tuple[str, dict]]) -> str:
        parts = [self.start]
        for name, args in calls:
            parts.append(f'<{T}invoke name="{name}">')
            for k, v in args.items():
                if isinstance(v, str):
                    parts.append(f'<{T}parameter name="{k}" string="true">{v}</{T}parameter>')
                else:
                    parts.append(f'<{T}parameter name="{k}" string="false">'
                                 f'{json.dumps(v, ensure_ascii=False)}</{T}parameter>')
            parts.append(f"</{T}invoke>")
        parts.append(self.end)
        return "\n".join(parts)

    def forced_prefix(self, name: str | None) -> str:
        return f"{self.start}\n<{T}invoke name=\"" + (f'{name}">\n' if name else "")
