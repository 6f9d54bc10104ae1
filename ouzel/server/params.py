"""Sampling and limit fields shared by every API (each API names a few of them differently)."""
from __future__ import annotations

from ..engine.sampler import SamplingParams
from .errors import ApiError, field


def sampling(body: dict, ctx_left: int, *, max_names=("max_tokens",), stop_name="stop",
             default_temperature: float = 1.0) -> SamplingParams:
    max_tokens = None
    for name in max_names:
        value = field(body, name, int)
        if value is not None:
            if value < 0 or (value == 0 and name != "max_tokens"):
                raise ApiError(400, f"'{name}' must be positive (got {value})", param=name)
            max_tokens = value
    if field(body, "n", int, 1) != 1:
        raise ApiError(400, "'n' > 1 is not supported; send separate requests (they are batched)", param="n")
    stop = body.get(stop_name)
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise ApiError(400, f"'{stop_name}' must be a string or an array of strings", param=stop_name)
    params = SamplingParams(
        temperature=field(body, "temperature", float, default_temperature),
        top_p=field(body, "top_p", float, 1.0),
        top_k=field(body, "top_k", int, 0),
        min_p=field(body, "min_p", float, 0.0),
        seed=field(body, "seed", int),
        max_tokens=max_tokens if max_tokens is not None else max(ctx_left, 0),
        stop=list(stop or []),
        ignore_eos=bool(field(body, "ignore_eos", bool, False)),
    )
    if params.temperature > 2.0 + 1e-9 or params.temperature < 0:
        raise ApiError(400, f"'temperature' must be in [0, 2] (got {params.temperature})", param="temperature")
    try:
        return params.validate()
    except Exception as e:  # OuzelError with the reason
        raise ApiError(400, str(e)) from None


def logprobs(body: dict) -> int | None:
    """None when off, else how many alternatives per token (chat: logprobs bool + top_logprobs;
    completions: logprobs int)."""
    lp = body.get("logprobs")
    if lp is None or lp is False:
        return None
    if lp is True:
        n = field(body, "top_logprobs", int, 0)
    elif isinstance(lp, int):
        n = lp
    else:
        raise ApiError(400, "'logprobs' must be a boolean or an integer", param="logprobs")
    if not 0 <= n <= 20:
        raise ApiError(400, f"top_logprobs must be in [0, 20] (got {n})", param="top_logprobs")
    return n


# --- reasoning controls -> chat-template variables ---
# OpenAI's efforts (the openai client's set); "none" turns thinking off for on/off templates
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
# set by the server itself: a request cannot override them through chat_template_kwargs
RESERVED = ("messages", "tools", "add_generation_prompt")


def _effort(value, param: str) -> dict:
    if value is None:
        return {}
    if value not in EFFORTS:
        raise ApiError(400, f"'{param}' must be one of {', '.join(EFFORTS)} (got {value!r})", param=param)
    on = value != "none"
    # enable_thinking: Qwen3 / SmolLM3 templates; thinking: DeepSeek V3.1+; reasoning_effort: gpt-oss
    return {"enable_thinking": on, "thinking": on, "reasoning_effort": value}


def template_kwargs(body: dict) -> dict:
    """`chat_template_kwargs` (vLLM's extension, taken by every API here), verbatim."""
    kw = field(body, "chat_template_kwargs", dict, {})
    for key in kw:
        if key in RESERVED:
            raise ApiError(400, f"'chat_template_kwargs' cannot set {key!r}; it comes from the request itself",
                           param="chat_template_kwargs")
    return kw


def openai_chat_reasoning(body: dict) -> dict:
    """Template variables of a chat completion: `reasoning_effort`, then `chat_template_kwargs`
    (which win: they are the explicit, template-specific form)."""
    return {**_effort(field(body, "reasoning_effort", str), "reasoning_effort"), **template_kwargs(body)}


def responses_reasoning(body: dict) -> tuple[dict, str | None]:
    """Template variables of a Responses request (`reasoning.effort`) and the reasoning summary
    asked for (`reasoning.summary`, or None)."""
    r = field(body, "reasoning", dict, {})
    effort = field(r, "effort", str, where="reasoning")
    summary = field(r, "summary", str, where="reasoning")
    if summary not in (None, "auto", "concise", "detailed"):
        raise ApiError(400, f"'reasoning.summary' must be auto, concise or detailed (got {summary!r})",
                       param="reasoning.summary")
    return {**_effort(effort, "reasoning.effort"), **template_kwargs(body)}, summary


def anthropic_thinking(body: dict, max_tokens: int) -> dict:
    """Template variables of an Anthropic `thinking` config: {"type": "enabled", "budget_tokens": N}
    (or "adaptive") turns thinking on, {"type": "disabled"} off. The budget is checked, not enforced:
    the model thinks until it closes its thought or max_tokens runs out."""
    t = field(body, "thinking", dict)
    out = {}
    if t is not None:
        kind = t.get("type")
        if kind == "enabled":
            budget = field(t, "budget_tokens", int, required=True, where="thinking")
            if not 0 < budget < max_tokens:
                raise ApiError(400, f"'thinking.budget_tokens' must be positive and less than max_tokens "
                                    f"({max_tokens}), got {budget}", param="thinking.budget_tokens")
        elif kind not in ("disabled", "adaptive"):
            raise ApiError(400, f"'thinking.type' must be enabled, adaptive or disabled (got {kind!r})",
                           param="thinking.type")
        on = kind != "disabled"
        out = {"enable_thinking": on, "thinking": on}
    return {**out, **template_kwargs(body)}
