"""Tool-call parsing on recorded native text of each family, streamed character by character."""
from __future__ import annotations

import json

import pytest

from ouzel.text.tool_formats import FORMATS, ToolStream, format_for, parse_tool_calls

T = "｜DSML｜"
CASES = {
    "hermes": ('I will check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
               "I will check.", [("get_weather", {"city": "Paris"})]),
    "llama3": ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
               '{"name": "get_time", "parameters": {"tz": "CET"}}',
               "", [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]),
    "dsml": (f'Let me look.\n\n<{T}function_calls>\n<{T}invoke name="get_weather">\n'
             f'<{T}parameter name="city" string="true">Paris</{T}parameter>\n'
             f'<{T}parameter name="days" string="false">3</{T}parameter>\n</{T}invoke>\n</{T}function_calls>',
             "Let me look.\n\n", [("get_weather", {"city": "Paris", "days": 3})]),
}


@pytest.mark.parametrize("family", CASES)
def test_parse_whole_reply(family):
    text, want_text, want = CASES[family]
    plain, calls = parse_tool_calls(text, FORMATS[family])
    assert plain == want_text
    assert [(c.name, json.loads(c.arguments)) for c in calls] == want


@pytest.mark.parametrize("family", CASES)
def test_stream_announces_name_before_arguments_end(family):
    text, want_text, want = CASES[family]
    s = ToolStream(FORMATS[family])
    events, first_start = [], None
    for i, ch in enumerate(text):
        for e in s.push(ch):
            events.append(e)
            if e[0] == "call_start" and first_start is None:
                first_start = i
    events += s.finish()
    assert "".join(e[1] for e in events if e[0] == "text") == want_text
    assert [e[1].name for e in events if e[0] == "call_done"] == [n for n, _ in want]
    if family != "llama3":  # Llama 3 calls are whole replies: known complete only at the end
        assert first_start < len(text) - 10
    assert s.raw == text


@pytest.mark.parametrize("family", CASES)
def test_render_then_parse_round_trips(family):
    fmt = FORMATS[family]
    calls = [("search", {"q": "ouzel", "n": 2})]
    assert [(c.name, json.loads(c.arguments)) for c in parse_tool_calls(fmt.render(calls), fmt)[1]] == calls


def test_plain_text_and_lookalikes_stay_text():
    for text in ["No tools needed.", "a < b and <tool", "<tool_call>not json</tool_call>"]:
        plain, calls = parse_tool_calls(text, FORMATS["hermes"])
        assert plain == text and calls == []
    assert parse_tool_calls('Use {"a": 1}', FORMATS["llama3"]) == ('Use {"a": 1}', [])


def test_format_chosen_from_template():
    assert format_for("{% if tools %}<tool_call>{% endif %}").name == "hermes"
    assert format_for("<|python_tag|>").name == "llama3"
    assert format_for("｜DSML｜").name == "dsml"
    assert format_for("plain").name == "hermes"
