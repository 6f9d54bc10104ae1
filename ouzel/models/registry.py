"""Architecture registry: GGUF `general.architecture` and HF `model_type` -> model class."""
from __future__ import annotations

from ..errors import UnsupportedError
from .deepseek_v4 import DeepseekV4ForCausalLM
from .gemma3 import Gemma3ForCausalLM
from .llama import LlamaForCausalLM
from .qwen3_moe import Qwen3MoeForCausalLM

ARCHITECTURES = {
    "llama": LlamaForCausalLM,
    "gemma3": Gemma3ForCausalLM,
    "deepseek_v4": DeepseekV4ForCausalLM,
    "qwen3_moe": Qwen3MoeForCausalLM,
}

# other names the same code serves (HF model_type or GGUF architecture)
ALIASES = {
    "gemma3_text": "gemma3",
    "mistral": "llama",
    "deepseek4": "deepseek_v4",  # GGUF general.architecture
    "qwen3moe": "qwen3_moe",  # GGUF general.architecture
}


def canonical(arch: str) -> str:
    arch = ALIASES.get(arch, arch)
    if arch not in ARCHITECTURES:
        raise UnsupportedError(f"unsupported architecture {arch!r}; supported: {', '.join(sorted(ARCHITECTURES))}")
    return arch


def model_class(arch: str):
    return ARCHITECTURES[canonical(arch)]
