"""A model's hyper-parameters, under Hugging Face `config.json` field names whatever the source."""
from __future__ import annotations

from typing import Any

from ..errors import OuzelError


class Config(dict):
    """config.json fields with attribute access; a missing required field is a clear error."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise OuzelError(f"model config has no {name!r}") from None

    def opt(self, name: str, default: Any = None) -> Any:
        value = self.get(name)
        return default if value is None else value

    @property
    def head_dim(self) -> int:
        return self.opt("head_dim") or self.hidden_size // self.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.opt("num_key_value_heads", self.num_attention_heads)
