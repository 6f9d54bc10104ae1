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
