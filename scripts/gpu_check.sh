#!/usr/bin/env bash
# The foundation's correctness tests on a CUDA machine (the `device` tool), with tiny models:
# every block type's dequantizer on CUDA, the transformers oracle with OUZEL_TEST_DEVICE=cuda,
# and `ouzel run --device cuda` end to end on a tiny GGUF. Real model packages are too big to carry.
set -uo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
# the oracle compares at 1e-5: float32 KV, prefill matmuls and decode activations (the CUDA defaults
# are float16 KV, bf16 prefill operands and int8 decode activations, as llama.cpp's)
OUZEL_TEST_DEVICE=cuda OUZEL_KV_DTYPE=f32 OUZEL_CUDA_PREFILL_DTYPE=f32 OUZEL_EXACT_GEMV=1 python3 -m pytest -q -p no:cacheprovider tests/test_quant_blocks.py \
  tests/test_hf_oracle.py 2>&1 | tail -3
python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_triton_attention.py \
  tests/test_triton_fused.py tests/test_cuda_graph.py 2>&1 | tail -3
python3 - <<'PY'
import sys, tempfile, subprocess
sys.path.insert(0, "tests")
import tiny_models as tm
d = tempfile.mkdtemp()
for arch in ("llama", "gemma3"):
    m = tm.build_hf_model(arch)
    path = tm.write_gguf(m, arch, f"{d}/{arch}.gguf", "Q8_0")
    r = subprocess.run([sys.executable, "-m", "ouzel", "run", "-m", str(path), "-p", "hello world", "-n", "8",
                        "--temperature", "0", "--ignore-eos", "--device", "cuda"], capture_output=True, text=True)
    print(arch, "rc", r.returncode, "| stderr:", r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "")
PY
