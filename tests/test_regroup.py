"""Weights regrouped for the GPU at load (`loader._regroup_for_gpu`): same values, stored once."""
import pytest
import torch
from torch import nn

from ouzel.kernels.triton.testing import random_blocks, rel_err
from ouzel.layers.linear import Embedding, Linear
from ouzel.loader import _regroup_for_gpu
from ouzel.quant.blocks import block_type, dequantize
from ouzel.quant.tensor import QTensor


def _q6k(rows: int, k: int, seed: int) -> QTensor:
    raw = random_blocks("Q6_K", rows, k, torch.Generator().manual_seed(seed))
    return QTensor(raw, block_type("Q6_K"), (rows, k))


def test_regroup_q6_k_linears():
    m = nn.Module()
    m.a, m.b, m.c, m.small, m.emb = Linear(4096, 8), Linear(4096, 8), Linear(4096, 5), Linear(256, 4), Embedding(5, 4096)
    m.a.weight = m.b.weight = _q6k(8, 4096, 0)  # two Linears, one weight
    m.c.weight = m.emb.weight = _q6k(5, 4096, 1)  # shared with an embedding: left as is
    m.small.weight = _q6k(4, 256, 2)  # K % 2048 != 0: left as is
    m.d = Linear(4096, 5)  # another QTensor over the embedding's bytes (a view): left as is
    m.d.weight = QTensor(m.emb.weight.raw[:], block_type("Q6_K"), (5, 4096))
    m.e = Linear(4096, 8)  # another QTensor over a's bytes: regrouped with a, once
    m.e.weight = QTensor(m.a.weight.raw, block_type("Q6_K"), (8, 4096))
    want = {n: dequantize(getattr(m, n).weight.raw, block_type("Q6_K")) for n in ("a", "c", "small")}
    raw_a = m.a.weight.raw
    _regroup_for_gpu(m)
    assert m.a.weight.bt.name == "Q6_K_R8" and m.b.weight is m.a.weight
    assert m.a.weight.raw.data_ptr() == raw_a.data_ptr()  # in place: nothing stored twice
    assert torch.equal(m.a.weight.dequantize(), want["a"])
    assert m.c.weight.bt.name == "Q6_K" and torch.equal(m.c.weight.dequantize(), want["c"])
    assert m.d.weight.bt.name == "Q6_K" and m.e.weight is m.a.weight
    assert m.small.weight.bt.name == "Q6_K" and torch.equal(m.small.weight.dequantize(), want["small"])
    x = torch.randn(3, 4096)
    assert torch.allclose(m.a(x), x @ want["a"].T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gpu_reads", [True, False])
def test_regroup_q6_k_r3_linears(gpu_reads, monkeypatch):
    """Q6_K Linears of K % 768 == 0 but K % 2048 != 0 become Q6_K_R3 in a new tensor (a weight two
    Linears share, once), K % 2048 == 0 stays R8 in place; only where the GPU kernels read R3."""
    pytest.importorskip("triton")
    from ouzel.kernels.triton import gguf
    reads = gguf.supports
    monkeypatch.setattr(gguf, "supports", lambda name: gpu_reads if name == "Q6_K_R3" else reads(name))
    m = nn.Module()
    m.a, m.b, m.r8, m.emb = Linear(768, 8), Linear(768, 8), Linear(2048, 4), Embedding(5, 768)
    m.a.weight = m.b.weight = _q6k(8, 768, 0)
    m.r8.weight = _q6k(4, 2048, 1)
    m.emb.weight = _q6k(5, 768, 2)
    m.c = Linear(768, 5)  # over the embedding's bytes: left as is
    m.c.weight = QTensor(m.emb.weight.raw, block_type("Q6_K"), (5, 768))
    m.big = Linear(1536, 13400)  # 13400 rows of 1260 bytes: two 16 MB slices
    m.big.weight = _q6k(13400, 1536, 3)
    want = {n: getattr(m, n).weight.dequantize() for n in ("a", "r8", "c", "big")}
    raws = {n: getattr(m, n).weight.raw for n in want}
    _regroup_for_gpu(m)
    assert m.r8.weight.bt.name == "Q6_K_R8" and m.r8.weight.raw.data_ptr() == raws["r8"].data_ptr()
    assert m.c.weight.bt.name == "Q6_K"
    for n in ("a", "big"):
        w = getattr(m, n).weight
        if gpu_reads:
            assert w.bt.name == "Q6_K_R3" and w.raw.shape == (w.shape[0], w.shape[1] // 768 * 640)
        else:
            assert w.bt.name == "Q6_K" and w.raw is raws[n]
    assert m.b.weight is m.a.weight
    for n, w in want.items():
        assert torch.equal(getattr(m, n).weight.dequantize(), w)
    x = torch.randn(3, 768)
    assert torch.allclose(m.a(x), x @ want["a"].T, rtol=1e-4, atol=1e-4)


def test_regroup_q8_0_linears():
    """Q8_0 Linears of K % 256 == 0 become Q8_0_R8 in place; other layers' Q8_0 weights stay GGUF's."""
    raw = lambda rows, k, seed: random_blocks("Q8_0", rows, k, torch.Generator().manual_seed(seed))  # noqa: E731
    m = nn.Module()
    m.a, m.odd, m.emb = Linear(768, 1030), Linear(96, 4), Embedding(5, 256)
    m.a.weight = QTensor(raw(1030, 768, 0), block_type("Q8_0"), (1030, 768))  # > one 1024-row slice
    m.odd.weight = QTensor(raw(4, 96, 1), block_type("Q8_0"), (4, 96))  # K % 256 != 0: left as is
    m.other = nn.Module()
    m.other.weight = QTensor(raw(4, 256, 2), block_type("Q8_0"), (4, 256))  # not a Linear: left as is
    m.emb.weight = QTensor(raw(5, 256, 3), block_type("Q8_0"), (5, 256))
    want = {n: getattr(m, n).weight.dequantize() for n in ("a", "odd", "other")}
    raw_a = m.a.weight.raw
    _regroup_for_gpu(m)
    assert m.a.weight.bt.name == "Q8_0_R8" and m.a.weight.raw.data_ptr() == raw_a.data_ptr()
    assert torch.equal(m.a.weight.dequantize(), want["a"])
    for n in ("odd", "other"):
        assert getattr(m, n).weight.bt.name == "Q8_0" and torch.equal(getattr(m, n).weight.dequantize(), want[n])
    x = torch.randn(2, 768)
    assert torch.allclose(m.a(x), x @ want["a"].T, rtol=1e-4, atol=1e-4)


def test_regroup_deepseek_v4_q8_0(tmp_path):
    """Every DeepSeek V4 weight of K % 256 == 0 stored as Q8_0, then the Linears regrouped: the same
    logits (nothing on the V4 path reads a Linear's bytes as GGUF's Q8_0 layout)."""
    import sys
    from pathlib import Path

    import gguf
    sys.path.insert(0, str(Path(__file__).parent))
    import tiny_models as tm
    from tiny_deepseek_v4 import ouzel_full, rel_l2

    import ouzel
    try:
        from tiny_deepseek_v4 import build_v4
        model = build_v4(seed=3, hidden_size=256, moe_intermediate_size=256)
    except ImportError as e:
        pytest.skip(f"transformers has no DeepSeek V4: {e}")
    m = ouzel.load(tm.save_hf_dir(model, tmp_path / "hf"), progress=False).model
    q8 = block_type("Q8_0")
    for mod in m.modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[1] % 256 == 0 and not isinstance(mod, Embedding):
            raw = gguf.quants.quantize(w.float().numpy(), gguf.GGMLQuantizationType.Q8_0)
            mod.weight = QTensor(torch.from_numpy(raw), q8, tuple(w.shape))
    ids = torch.randint(2, m.config.vocab_size, (40,), generator=torch.Generator().manual_seed(5))
    before = ouzel_full(m, ids)
    _regroup_for_gpu(m)
    names = {n: mod.weight.bt.name for n, mod in m.named_modules() if isinstance(getattr(mod, "weight", None), QTensor)}
    assert names["lm_head"] == "Q8_0_R8" and names["model.layers.1.self_attn.q_a_proj"] == "Q8_0_R8"
    assert names["model.layers.1.mlp.shared_experts.down_proj"] == "Q8_0_R8"
    assert names["model.layers.1.mlp.gate"] == "Q8_0"  # the router is not a Linear
    assert rel_l2(ouzel_full(m, ids), before) < 1e-5


def _stack(name: str, E: int, rows: int, k: int, seed: int):
    from ouzel.layers.moe import ExpertStack
    raw = random_blocks(name, E * rows, k, torch.Generator().manual_seed(seed))
    return ExpertStack.from_stacked([QTensor(raw, block_type(name), (E * rows, k))], (E, rows, k))


def _experts(gate_up, down, hidden: int, inter: int):
    from ouzel.layers.moe import RoutedExperts
    m = nn.Module()
    m.experts = RoutedExperts(hidden, inter, gate_up.shape[0], None)
    m.experts.gate_up_proj, m.experts.down_proj = gate_up, down
    return m


def _expert_out(m, hidden: int, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, hidden, generator=g)
    idx = torch.stack([torch.randperm(m.experts.n_experts, generator=g)[:2] for _ in range(3)])
    return m.experts(x, torch.rand(3, 2, generator=g), idx)


@pytest.mark.parametrize("gu_name,down_name", [("Q8_0", "Q6_K"), ("Q6_K", "Q8_0")])
def test_regroup_expert_stacks(gu_name, down_name):
    """Routed experts' stacked blocks are regrouped in place too, the experts' views rebuilt over
    them: same values through the torch reference (every expert's rows, and the MoE output)."""
    E, D, I = 3, 2048, 2048
    m = _experts(_stack(gu_name, E, 2 * I, D, 0), _stack(down_name, E, D, I, 1), D, I)
    want = [m.experts.gate_up_proj.stacked[0].dequantize(), m.experts.down_proj.stacked[0].dequantize()]
    out = _expert_out(m, D)
    raws = [m.experts.gate_up_proj.stacked[0].raw, m.experts.down_proj.stacked[0].raw]
    _regroup_for_gpu(m)
    for stack, name, raw, w in zip((m.experts.gate_up_proj, m.experts.down_proj), (gu_name, down_name), raws, want):
        (piece,) = stack.stacked
        assert piece.bt.name == f"{name}_R8" and piece.raw.data_ptr() == raw.data_ptr()
        assert torch.equal(piece.dequantize(), w)
        assert all(p[0].bt.name == piece.bt.name and p[0].raw.untyped_storage().data_ptr() == raw.data_ptr()
                   for p in stack.parts)
        rows = w.shape[0] // E
        assert torch.equal(stack.parts[1][0].dequantize(), w[rows:2 * rows])
    assert rel_err(_expert_out(m, D), out) < 1e-5


def test_regroup_expert_stack_q6_k_r3():
    """Qwen3-30B-A3B's Q6_K expert down projections (K = 768, not whole R8 groups) become Q6_K_R3:
    a new stack (640 bytes per 3 blocks), the experts' views rebuilt over it; same values."""
    E, D, I = 3, 256, 768
    m = _experts(_stack("Q8_0", E, 2 * I, D, 0), _stack("Q6_K", E, D, I, 1), D, I)
    want = m.experts.down_proj.stacked[0].dequantize()
    out = _expert_out(m, D)
    _regroup_for_gpu(m)
    assert m.experts.gate_up_proj.stacked[0].bt.name == "Q8_0_R8"
    (piece,) = m.experts.down_proj.stacked
    assert piece.bt.name == "Q6_K_R3" and piece.raw.shape == (E * D, 640) and torch.equal(piece.dequantize(), want)
    assert all(p[0].bt.name == "Q6_K_R3" and p[0].raw.untyped_storage().data_ptr() == piece.raw.data_ptr()
               for p in m.experts.down_proj.parts)
    assert torch.equal(m.experts.down_proj.parts[1][0].dequantize(), want[D:2 * D])
    assert rel_err(_expert_out(m, D), out) < 1e-5


def test_regroup_expert_stack_left_as_is():
    """Experts whose rows no regrouping's block divides (Q6_K, K = 256) keep GGUF's layout."""
    m = _experts(_stack("Q8_0", 2, 512, 256, 0), _stack("Q6_K", 2, 256, 256, 1), 256, 256)
    down = m.experts.down_proj
    _regroup_for_gpu(m)
    assert m.experts.gate_up_proj.stacked[0].bt.name == "Q8_0_R8"
    assert m.experts.down_proj is down and down.stacked[0].bt.name == "Q6_K"


@pytest.mark.parametrize("gpu_reads", [False, True])
def test_regroup_q2_k_iq2_xxs(gpu_reads, monkeypatch):
    """DeepSeek V4's expert types: Q2_K -> Q2_K_R8, IQ2_XXS -> IQ2_XXS_R8 (Linears and experts),
    value-preserving; only where every CUDA kernel path (kernels/triton/gguf.py) reads them."""
    pytest.importorskip("triton")
    from ouzel.kernels.triton import gguf
    reads, new = gguf.supports, ("Q2_K_R8", "IQ2_XXS_R8")
    monkeypatch.setattr(gguf, "supports", lambda name: gpu_reads if name in new else reads(name))
    E, D, I = 2, 2048, 2048
    m = _experts(_stack("IQ2_XXS", E, 2 * I, D, 0), _stack("Q2_K", E, D, I, 1), D, I)
    m.lin = Linear(2048, 5)
    m.lin.weight = QTensor(random_blocks("Q2_K", 5, 2048, torch.Generator().manual_seed(2)), block_type("Q2_K"),
                           (5, 2048))
    want = {n: w.dequantize() for n, w in (("gu", m.experts.gate_up_proj.stacked[0]),
                                           ("down", m.experts.down_proj.stacked[0]), ("lin", m.lin.weight))}
    out = _expert_out(m, D)
    _regroup_for_gpu(m)
    got = {"gu": m.experts.gate_up_proj.stacked[0], "down": m.experts.down_proj.stacked[0], "lin": m.lin.weight}
    names = {"gu": "IQ2_XXS", "down": "Q2_K", "lin": "Q2_K"}
    for n, w in got.items():
        assert w.bt.name == names[n] + ("_R8" if gpu_reads else "")
        assert torch.equal(w.dequantize(), want[n])
    assert rel_err(_expert_out(m, D), out) < 1e-5
