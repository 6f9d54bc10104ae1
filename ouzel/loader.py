"""Build a ready model from a GGUF file or a HF directory: config, modules, weights, tokenizer."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import OuzelError
from .formats import gguf_names
from .formats.gguf import GGUFFile
from .formats.sources import GGUFSource, SafetensorsSource, read_hf_config
from .hub import resolve
from .models import registry
from .models.config import Config
from .quant.tensor import QTensor

log = logging.getLogger("ouzel")


@dataclass
class Loaded:
    model: nn.Module
    config: Config
    tokenizer: object
    path: Path
    architecture: str
    chat_template: str | None
    nbytes: int


def cuda_allocator_defaults() -> None:
    """Expandable segments for torch's CUDA allocator unless the user configured it: a prefill whose
    scratch grows with the context (DeepSeek V4's walk to 16k) left the default allocator holding
    31.8 GiB of segments for 17.2 GiB of tensors; with expandable segments 18.9 GiB, at the same
    speed (H100, bench/NOTES.md, session 10). Takes effect only before torch's first CUDA
    allocation, which is when the allocator reads its settings."""
    if any(v in os.environ for v in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")):
        return
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def resolve_device(device: str | torch.device | None) -> torch.device:
    name = str(device or "auto")
    if name == "auto":
        if torch.cuda.is_available():
            cuda_allocator_defaults()
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise OuzelError(f"unknown device {name!r}; use cpu, cuda, mps or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OuzelError("device 'cuda' is not available (no CUDA GPU or a CPU-only torch build)")
    if dev.type == "cuda":
        cuda_allocator_defaults()
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise OuzelError("device 'mps' is not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise OuzelError(f"device {name!r} is not supported; use cpu, cuda, mps or auto")
    return dev


def _weight_slots(model: nn.Module):
    """(hf_name, module, attr, shape) for every weight the model needs, in module order."""
    for mod_name, mod in model.named_modules():
        shapes = getattr(mod, "expected_shapes", None)
        if shapes is None:
            continue
        for attr, shape in shapes().items():
            yield f"{mod_name}.{attr}", mod, attr, shape


def load_weights(model: nn.Module, source, device: torch.device, progress: bool = True) -> None:
    from tqdm import tqdm

    slots = list(_weight_slots(model))
    tied = getattr(model, "tied_weights", {})
    done: dict[str, object] = {}
    for hf_name, mod, attr, shape in tqdm(slots, desc="loading", unit="tensor", disable=not progress,
                                          leave=False):
        if hf_name in tied and not source.has(hf_name):
            w = done[tied[hf_name]]
        else:
            w = source.get(hf_name, shape)
            if device.type != "cpu":
                w = w.to(device)
        done[hf_name] = w
        setattr(mod, attr, w)
    # the regroup and fuse below replace weights by new tensors: no reference here may keep the
    # old ones alive (they were, all at once: llama8b's load peaked 2.4 GiB above its weights)
    done = w = None
    if device.type == "cuda":  # one matmul for q/k/v (and gate/up) where their blocks allow it
        _regroup_for_gpu(model)
        for mod in model.modules():
            if hasattr(mod, "fuse_weights"):
                mod.fuse_weights()
                _trim_cuda_cache()


CUDA_CACHE_TRIM = 256 << 20  # bytes of free GPU memory torch may keep cached through a load


def _trim_cuda_cache() -> None:
    """Hand torch's cached free GPU memory back to the device once it passes CUDA_CACHE_TRIM. The
    regroup and fuse at load free the old weights after making new ones, and a freed weight's bytes
    fit none of the (larger) new tensors that follow: kept cached, they were the peak's 3.9 GiB
    reserved over 17.3 allocated for Qwen3-30B-A3B (bench/memory_trace.py, H100, session 14)."""
    if torch.cuda.memory_reserved() - torch.cuda.memory_allocated() > CUDA_CACHE_TRIM:
        torch.cuda.empty_cache()


def _regroup_for_gpu(model) -> None:
    """Q6_K / Q8_0 / Q2_K / IQ2_XXS weights of Linears and routed experts -> their `_R8`
    regroupings (quant/blocks.py: same bytes regrouped so the GPU reads 16-byte words; the decode
    GEMVs run ~2x faster), in place; Q6_K rows of K % 2048 != 0 but K % 768 == 0 (Qwen3-30B-A3B's
    expert down projections) -> `Q6_K_R3`, which pads each 3 blocks and so takes a new tensor (the
    old bytes are dropped with the old QTensor). Not for weights an Embedding shares (they would be
    stored twice), rows no regrouping's block divides, nor types some CUDA kernel on the weights'
    paths (GEMV, dequantize, MoE GEMM: kernels/triton/gguf.py) does not read. OUZEL_NO_REGROUP=1
    keeps the GGUF layout."""
    if os.environ.get("OUZEL_NO_REGROUP"):
        return
    from .layers.linear import Embedding, Linear
    from .layers.moe import ExpertStack
    from .quant import blocks as B
    from .quant.tensor import QTensor
    try:
        from .kernels.triton.gguf import supports as gpu_reads
    except ImportError:  # no Triton: only the torch reference runs, and it reads every type
        def gpu_reads(name: str) -> bool:
            return True
    regroup: dict[str, list] = {}  # GGUF type -> its regroupings, preferred first
    for name, bt, repack in (
            ("Q6_K", B.Q6_K_R8, B.repack_q6_k_r8), ("Q6_K", B.Q6_K_R3, B.repack_q6_k_r3),
            ("Q8_0", B.Q8_0_R8, B.repack_q8_0_r8), ("Q2_K", B.Q2_K_R8, B.repack_q2_k_r8),
            ("IQ2_XXS", B.IQ2_XXS_R8, B.repack_iq2_xxs_r8)):
        if gpu_reads(bt.name):
            regroup.setdefault(name, []).append((bt, repack))

    def storage(t: torch.Tensor) -> int:
        return t.untyped_storage().data_ptr()

    # bytes an Embedding reads (even through another view of them) stay as they are
    shared = {storage(m.weight.raw) for m in model.modules() if isinstance(m, Embedding) and isinstance(m.weight, QTensor)}
    done: dict[tuple, QTensor] = {}  # a weight two modules share is regrouped once

    def regrouped(w):
        if not isinstance(w, QTensor):
            return w
        key = (storage(w.raw), w.raw.storage_offset(), tuple(w.raw.shape), w.bt.name)
        fits = [(bt, repack) for bt, repack in regroup.get(w.bt.name, ()) if w.shape[1] % bt.block_elems == 0]
        if key not in done and fits and w.raw.is_contiguous() and storage(w.raw) not in shared:
            bt, repack = fits[0]
            n, row_bytes = w.shape[0], bt.row_bytes(w.shape[1])
            # same size: in place; padded (Q6_K_R3): the new tensor only. 16 MB at a time either way
            out = w.raw if row_bytes == w.raw.shape[1] else w.raw.new_empty((n, row_bytes))
            rows = max(1, (16 << 20) // w.raw.shape[1])
            for i in range(0, n, rows):
                out[i:i + rows] = repack(w.raw[i:i + rows])
            done[key] = QTensor(out, bt, w.shape)
        return done.get(key, w)

    for mod in model.modules():
        if isinstance(mod, Linear) or getattr(mod, "gpu_regroup", False):  # + V4's grouped projection
            mod.weight = regrouped(getattr(mod, "weight", None))
        for name in [n for n, v in vars(mod).items() if isinstance(v, ExpertStack)]:  # routed experts
            stack = getattr(mod, name)
            if stack.stacked is not None:  # the experts' views are rebuilt over the regrouped stacks
                pieces = [regrouped(w) for w in stack.stacked]
                if any(a is not b for a, b in zip(pieces, stack.stacked)):
                    setattr(mod, name, ExpertStack.from_stacked(pieces, stack.shape))
            else:
                stack.parts = [[regrouped(b) for b in p] for p in stack.parts]
        stack = pieces = None  # the replaced weights are freed here, then their bytes handed back
        _trim_cuda_cache()


def load(ref: str | Path, device: str | torch.device = "cpu", progress: bool = True) -> Loaded:
    from .text.tokenizer import Tokenizer

    path = resolve(str(ref))
    dev = resolve_device(device)
    if path.is_dir():
        raw_cfg = read_hf_config(path)
        arch = registry.canonical(raw_cfg.get("model_type", "?"))
        source = SafetensorsSource(path)
        tokenizer = Tokenizer.from_hf_dir(path)
    else:
        f = GGUFFile(path)
        arch = registry.canonical(f.architecture)
        raw_cfg = gguf_names.config_from_gguf(arch, f.meta, str(path))
        if "rope_freqs.weight" in f.tensors:  # Llama 3.x: rope scaling stored as per-frequency factors
            from .quant.blocks import block_type, dequantize
            bt = block_type(f.tensors["rope_freqs.weight"].ggml_type)
            raw_cfg["rope_freq_factors"] = dequantize(f.raw("rope_freqs.weight"), bt).flatten().tolist()
        source = GGUFSource(f, arch, raw_cfg)
        tokenizer = Tokenizer.from_gguf(f.meta)
    cfg = Config(raw_cfg)
    model = registry.model_class(arch)(cfg)
    if hasattr(model, "weight_source"):  # a model whose checkpoints name/store weights their own way
        source = model.weight_source(source)
    load_weights(model, source, dev, progress)
    model.eval()
    return Loaded(model, cfg, tokenizer, path, arch, getattr(tokenizer, "chat_template", None), source.nbytes())


def weight_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for _, mod, attr, _ in _weight_slots(model):
        w = getattr(mod, attr)
        key = id(w.raw if isinstance(w, QTensor) else w)
        if key in seen:
            continue
        seen.add(key)
        total += w.numel() * w.element_size() if isinstance(w, torch.Tensor) else w.nbytes
    return total
