"""Compile a Triton kernel for sm_90 on a machine with no GPU (Triton's own ptxas) and summarize its
SASS: registers, spills, shared memory, and the instruction mix of the whole kernel and of its
innermost loop. For reading a kernel's cost before spending device time.

    python3 bench/sass.py                          # the MoE GEMM on IQ2_XXS_R8 at ds4's gate/up tile
    python3 bench/sass.py Q2_K_R8 16 64 4 2 1      # type, bm, bn, warps, stages, quads [halves prmt]
    SWIGLU=1 python3 bench/sass.py IQ2_XXS_R8 32 64 4 1 1 2 1   # with the silu(gate) * up epilogue
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ouzel.kernels.triton import gguf as G

TARGET = GPUTarget("cuda", 90, 32)


def compile_moe(tid: int, bm: int = 32, bn: int = 64, warps: int = 4, stages: int = 1, quads: bool = True,
                pdl: bool = False, maxnreg=None, halves: int = 1, prmt: bool = False, swiglu: bool = False):
    ptr = lambda t: "*" + t  # noqa: E731
    sig = dict(x_ptr=ptr("bf16"), w_ptr=ptr("u8"), out_ptr=ptr("bf16"), grid_ptr=ptr("i32"), signs_ptr=ptr("i32"),
               pair_row_ptr=ptr("i32"), tile_expert_ptr=ptr("i32"), tile_start_ptr=ptr("i32"),
               tile_end_ptr=ptr("i32"), N="i32", K="i32", row_bytes="i32", expert_bytes="i32",
               stride_xm="i32", stride_om="i32", TYPE="constexpr", S="constexpr", L="constexpr", BM="constexpr",
               BN="constexpr", DOT_DTYPE="constexpr", PRECISION="constexpr", QUADS="constexpr",
               STAGES="constexpr", PDL="constexpr", HALVES="constexpr", PRMT="constexpr", SWIGLU="constexpr",
               LIMIT="constexpr", limit="fp32")
    const = dict(TYPE=tid, S=8, L=32, BM=bm, BN=bn, DOT_DTYPE=tl.bfloat16, PRECISION="tf32", QUADS=quads,
                 STAGES=stages, PDL=pdl, HALVES=halves, PRMT=prmt, SWIGLU=swiglu, LIMIT=swiglu)
    # the launcher's divisibility-by-16 hints for pointers and the sizes that are multiples of 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, k in enumerate(sig) if sig[k].startswith("*")
             or k in ("N", "K", "row_bytes", "expert_bytes", "stride_xm", "stride_om")}
    src = ASTSource(G._moe_gemm_kernel, sig, const, attrs)
    return triton.compile(src, target=TARGET, options=dict(num_warps=warps, num_stages=1, **({"maxnreg": maxnreg} if maxnreg else {})))


def sass_of(kernel, flag: str = "-sass") -> str:
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        return subprocess.run([tool, flag, cubin], capture_output=True, text=True, check=True).stdout


def summarize(kernel, label: str) -> None:
    md = kernel.metadata
    sass = sass_of(kernel)
    lines = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", ln)]
    ops = []
    for ln in lines:
        m = re.match(r"\s+/\*([0-9a-f]{4})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)", ln)
        if m:
            ops.append((int(m.group(1), 16), m.group(3)))
    # the innermost loop: the backward branch with the smallest span
    loops = []
    for ln in lines:
        m = re.match(r"\s+/\*([0-9a-f]{4})\*/.*BRA\s+0x([0-9a-f]+)", ln)
        if m and int(m.group(2), 16) < int(m.group(1), 16):
            loops.append((int(m.group(2), 16), int(m.group(1), 16)))
    res = re.search(r"REG:(\d+).*?STACK:(\d+).*?LOCAL:(\d+)", sass_of(kernel, "-res-usage"), re.S)
    print(f"== {label}: {md.num_warps} warps, shared {md.shared} B, registers {res.group(1)}, stack "
          f"{res.group(2)}, local {res.group(3)}; {len(ops)} SASS ops")
    if loops:
        lo, hi = max(loops, key=lambda ab: ab[1] - ab[0])
        body = [op for a, op in ops if lo <= a <= hi]
        hist = collections.Counter(op.split(".")[0] for op in body)
        print(f"   loop {lo:#x}..{hi:#x}: {len(body)} ops: " + ", ".join(f"{k} {v}" for k, v in hist.most_common(24)))


def widths(kernel) -> str:
    """Counts of the memory instructions by full opcode (their vector widths)."""
    c = collections.Counter()
    for ln in sass_of(kernel).splitlines():
        m = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?((?:STS|LDG|LDS|LDSM|STSM|LDL|STL)[A-Z0-9_.]*)", ln)
        if m:
            c[m.group(1)] += 1
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items()))


if __name__ == "__main__":
    # python3 bench/sass.py [TYPE [bm bn warps stages quads [halves [prmt]]]]: the MoE GEMM on one block type
    name = sys.argv[1] if len(sys.argv) > 1 else "IQ2_XXS_R8"
    args = [int(v) for v in sys.argv[2:9]]
    bm, bn, warps, stages, quads, halves, prmt = args + [32, 64, 4, 1, 1, 1, 0][len(args):]
    k = compile_moe(G._TYPES[name][0], bm=bm, bn=bn, warps=warps, stages=stages, quads=bool(quads), halves=halves,
                    prmt=bool(prmt), swiglu=bool(int(os.environ.get("SWIGLU", "0"))))
    summarize(k, f"MoE GEMM {name} bm {bm} bn {bn} {warps} warps, {stages} stages, quads {quads}, halves {halves}, "
                 f"prmt {prmt}")
    print("   memory ops:", widths(k))
