"""Compile kernels of the decode step for sm_90 with PDL on (no GPU needed) and print, as JSON, what
their PTX does before `griddepcontrol.wait`: tests/test_pdl.py checks the contract of
ouzel/kernels/triton/pdl.py on the compiled code. Run without TRITON_INTERPRET (the interpreter's
kernels can't be compiled)."""
import json
import os
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ouzel.kernels.triton import attention, fused, q8act, router

# argument types by name; anything not listed is an i32 scalar
POINTERS = {"xq_ptr": "*i32", "dx_ptr": "*fp32", "sx_ptr": "*fp32", "w_ptr": "*i32", "out_ptr": "*fp32",
            "part_ptr": "*fp32", "cnt_ptr": "*i32", "mix_ptr": "*fp32", "idx_ptr": "*i64", "grid_ptr": "*i32",
            "signs_ptr": "*u8", "q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "len_ptr": "*i64",
            "tbl_ptr": "*i64", "o_ptr": "*fp32", "lse_ptr": "*fp32", "nk_ptr": "*bf16", "nv_ptr": "*bf16",
            "x_ptr": "*bf16", "r_ptr": "*bf16", "y_ptr": "*bf16", "h_ptr": "*bf16", "bias_ptr": "*fp32",
            "tab_ptr": "*i64", "ids_ptr": "*i64", "qk_scale": "fp32", "eps": "fp32", "scaling": "fp32",
            "inv_ptr": "*fp32", "wq_ptr": "*fp32", "wk_ptr": "*fp32", "norm_eps": "fp32", "wa_ptr": "*i32",
            "wb_ptr": "*i32", "part_a": "*fp32", "part_b": "*fp32", "sq_ptr": "*i8", "sdx_ptr": "*fp32",
            "ssx_ptr": "*fp32", "pair_ptr": "*i32", "limit": "fp32", "res_ptr": "*bf16", "nw_ptr": "*fp32"}
M1 = dict(BN=16, NB=2, SPLITS=4, SP=4, COMBINE=False, GP=1, USE_ASM=True)
ATT = dict(D=128, DP=128, BG=16, BN=64, PAGE=0, SPLIT_DOT=True, MAX_ITERS=0, NEW_KV=True, ROT=128, UNIT_OFFSET=False)
CASES = {  # name: (kernel, constexprs, whether the weights may be read before the wait)
    "q4k_m1 dense": (q8act._q4k_m1_kernel, dict(M1, HAS_IDX=False, SWIGLU=False, LIMIT=False), True),
    "q4k_m1 moe": (q8act._q4k_m1_kernel, dict(M1, HAS_IDX=True, SWIGLU=False, LIMIT=False), False),
    "q4k_m1 gate/up with the swiglu rows": (q8act._q4k_m1_kernel, dict(M1, HAS_IDX=False, SWIGLU=True, LIMIT=True,
                                                                       BN=32), True),
    "q6k_r8_m1 dense": (q8act._q6k_r8_m1_kernel, dict(M1, HAS_IDX=False, G=8, GW=420), True),
    "iq2xxs_r8_m1 moe": (q8act._iq2xxs_r8_m1_kernel, dict(M1, HAS_IDX=True), False),
    "q4k + q6k_r8 pair": (q8act._q4k_q6k_m1_kernel, dict(BN_A=16, NB_A=2, SPLITS_A=2, SP_A=2, BN_B=16, NB_B=2,
                                                         SPLITS_B=2, SP_B=2, G=8, GW=420, USE_ASM=True), True),
    "quant_x": (q8act._quant_x_kernel, dict(BLOCK=256), False),
    "decode attention split": (attention._split_kernel, dict(ATT, SPLITS=8, ONE_PASS=False, ROPE=False, NORM=False,
                                                             Q8=False), False),
    "decode attention, rope and q8": (attention._split_kernel, dict(ATT, SPLITS=1, ONE_PASS=True, ROPE=True,
                                                                    NORM=True, Q8=True), False),
    "rms_norm q8": (fused._rms_norm_kernel, dict(BD=4096, UNIT_OFFSET=False, RESIDUAL=True, Q8=True), False),
    "route_linear": (router._route_linear_kernel, dict(SPLITS=64, CH=64, BR=64, BD=64, BE=128, BK=8, SCORE=0,
                                                       HAS_BIAS=False, RENORM=True, HASH=False), False),
    "route_norm_linear": (router._route_norm_linear_kernel, dict(SPLITS=32, CH=32, BR=64, BD=64, BE=128, BK=8,
                                                                 BF=2048, SCORE=0, HAS_BIAS=False, RENORM=True,
                                                                 HASH=False, UNIT_OFFSET=False), False),
}
PATHS = {"q4k + q6k_r8 pair": 2}  # kernels whose programs take one of several bodies, each with its own wait


def facts(ptx: str) -> dict:
    parts = ptx.split("griddepcontrol.wait")
    before = parts[0]
    return {"waits": len(parts) - 1, "loads_before": before.count("ld.global"),
            "stores_before": before.count("st.global") + before.count("atom.") + before.count("red."),
            "loads_after": sum(p.count("ld.global") for p in parts[1:])}


def main() -> None:
    out = {}
    for name, (fn, consts, weights_first) in CASES.items():
        consts = dict(consts, PDL=True)
        sig = {a: POINTERS.get(a, "i32") for a in fn.arg_names if a not in consts}
        sig.update({k: "constexpr" for k in consts})
        k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=4, launch_pdl=True))
        out[name] = dict(facts(k.asm["ptx"]), weights_first=weights_first, paths=PATHS.get(name, 1))
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET=1")
    main()
