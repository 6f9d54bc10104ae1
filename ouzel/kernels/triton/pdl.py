"""Programmatic dependent launch (PDL, sm_90 and later) for the small kernels of a decode step.

A decode step is ~15 short kernels a layer (2-9 us each on an H100), and every boundary costs
the drain of one grid, the launch of the next and its first memory round trips. A kernel
launched with PDL may start while the kernel before it finishes: its launch and whatever it does
before `wait_for_inputs` overlap the other's tail (llama.cpp measured +5-13% decode on an H100
from this alone).

The contract, for every kernel taking a `PDL` constexpr:
- it calls `wait_for_inputs(PDL)` on every path, before it reads anything an earlier kernel
  wrote and before it writes anything (an earlier kernel may still be reading that memory);
- before that it may read only the model's weights, which no kernel writes while a model runs.
The wait returns once the previous kernel has completed and its writes are visible; since that
kernel waited for its own predecessor, every earlier kernel has completed too. After the wait
the kernel lets its successor launch (`gdc_launch_dependents`): at most two kernels are resident
at once, the running one and the next one at its wait.

`launch(device)` gives the arguments of a launch: the constexpr and Triton's `launch_pdl` option
together, so that a kernel is never launched early without waiting. On by default on sm_90+
(H100 tg128 +5% llama8b, +10% qwen3moe, +9% ds4flash: bench/NOTES.md, session 9); OUZEL_PDL=0 turns
it off; never in Triton's CPU interpreter, which has no inline PTX.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """Wait until the previous kernel's writes are visible, then let the next kernel launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


_ENABLED: dict = {}


def enabled(device: torch.device) -> bool:
    """PDL for kernels on `device`: CUDA of compute capability >= 9, not OUZEL_PDL=0, not the interpreter."""
    key = (device.type, device.index)
    if key not in _ENABLED:
        _ENABLED[key] = (device.type == "cuda" and os.environ.get("OUZEL_PDL", "1") != "0"
                         and os.environ.get("TRITON_INTERPRET") != "1"
                         and torch.cuda.get_device_capability(device)[0] >= 9)
    return _ENABLED[key]


def launch(device: torch.device) -> dict:
    """The launch arguments of a kernel with a PDL constexpr on `device`."""
    return dict(PDL=True, launch_pdl=True) if enabled(device) else dict(PDL=False)
