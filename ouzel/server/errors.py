"""Request errors with the status code and message the client sees, and field readers that raise them."""
from __future__ import annotations

from typing import Any


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


_TYPES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array",
          dict: "an object"}


def field(body: dict, name: str, types: type | tuple, default: Any = None, *, required: bool = False,
          where: str = "") -> Any:
    """body[name] checked against types (None counts as absent); 400 with the field's name if wrong.
    where: the enclosing object's path for nested fields (e.g. "thinking")."""
    value = body.get(name)
    if where:
        name = f"{where}.{name}"
    if value is None:
        if required:
            raise ApiError(400, f"'{name}' is required", param=name)
        return default
    types = types if isinstance(types, tuple) else (types,)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        want = " or ".join(_TYPES.get(t, t.__name__) for t in types)
        raise ApiError(400, f"'{name}' must be {want}, got {type(value).__name__}", param=name)
    return value


def openai_error(e: ApiError) -> dict:
    return {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}


def anthropic_error(e: ApiError) -> dict:
    kind = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large"}.get(e.status, e.kind)
    return {"type": "error", "error": {"type": kind, "message": e.message}}
