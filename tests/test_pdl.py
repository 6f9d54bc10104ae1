"""Programmatic dependent launch (ouzel/kernels/triton/pdl.py): its contract checked on kernels
compiled for sm_90 (no GPU needed), and where it applies.

The contract: a kernel launched early waits (`griddepcontrol.wait`) before it writes anything and
before it reads anything but the weights. A MoE GEMV's weight rows come from the router's output,
so it reads nothing at all before waiting. The decode with PDL on against PDL off on a GPU is in
tests/test_cuda_graph.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")


def test_off_where_it_cannot_run(monkeypatch):
    from ouzel.kernels.triton import pdl
    monkeypatch.setenv("OUZEL_PDL", "1")
    monkeypatch.setattr(pdl, "_ENABLED", {})
    assert pdl.launch(torch.device("cpu")) == {"PDL": False}


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = Path(__file__).parent
    env["PYTHONPATH"] = os.pathsep.join([str(here.parent), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, str(here / "pdl_ptx.py")], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_kernels_wait_before_touching_inputs_or_outputs(compiled):
    assert len(compiled) >= 8
    for name, f in compiled.items():
        assert f["waits"] == f["paths"], f"{name}: {f['waits']} griddepcontrol.wait on {f['paths']} paths"
        assert f["stores_before"] == 0, f"{name}: writes before waiting"
        assert f["loads_after"] > 0, name
        if f["weights_first"]:  # the prefetch of the first step's weights is what PDL buys a GEMV
            assert f["loads_before"] > 0, f"{name}: no weight load before the wait"
        else:
            assert f["loads_before"] == 0, f"{name}: reads before waiting"
