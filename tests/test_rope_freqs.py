"""Llama 3.x rope scaling in GGUF files: llama.cpp's converter stores it as a `rope_freqs` tensor
(one factor per rotary frequency, angle = position * theta_i / factor_i) instead of config keys.
A tiny Llama with transformers' "llama3" rope (scaled well inside the test's positions) written
as such a GGUF must give transformers' logits; without the tensor it must not."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402
from test_hf_oracle import REL_TOL, assert_close, close, hf_logits  # noqa: E402

import ouzel  # noqa: E402
from ouzel.errors import OuzelError  # noqa: E402

ROPE = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def rope_factors(head_dim: int) -> np.ndarray:
    """The converter's computation (convert_hf_to_gguf.py, LlamaModel), from the published recipe."""
    freqs = 1.0 / (ROPE["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    old, factor = ROPE["original_max_position_embeddings"], ROPE["factor"]
    lo, hi = ROPE["low_freq_factor"], ROPE["high_freq_factor"]
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    model = tm.build_hf_model("llama", seed=9, rope_parameters=ROPE)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    ids = list(range(2, 40))
    work = tmp_path_factory.mktemp("rope-freqs")
    with_f = tm.write_gguf(model, "llama", work / "with.gguf",
                           extra_tensors={"rope_freqs.weight": rope_factors(head_dim)})
    without = tm.write_gguf(model, "llama", work / "without.gguf")
    return model, ids, with_f, without, hf_logits(model, ids)


def test_rope_freqs_tensor_gives_transformers_llama3_rope(scaled):
    model, ids, with_f, without, ref = scaled
    assert_close(ouzel.load(with_f).logits(ids), ref, "llama3 rope via rope_freqs")
    assert close(ouzel.load(without).logits(ids), ref)[0] > 100 * REL_TOL  # the factors matter here


def test_rope_freqs_of_the_wrong_length_is_an_error(scaled, tmp_path):
    model = scaled[0]
    bad = tm.write_gguf(model, "llama", tmp_path / "bad.gguf", extra_tensors={"rope_freqs.weight": np.ones(3)})
    with pytest.raises(OuzelError, match="rope_freqs has 3 factors"):
        ouzel.load(bad)
