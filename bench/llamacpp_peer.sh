#!/usr/bin/env bash
# On the lent GPU: build llama.cpp's llama-bench for sm_90 and run it beside `ouzel bench` on the
# benchmark models, with the peak GPU memory of each process as nvidia-smi reports it (the same
# instrument for both: CUDA context, weights, KV and scratch), at pp512/tg128 and at a 16k depth.
#   MODELS="llama8b-q4km" bash bench/llamacpp_peer.sh
# Source: llama.cpp as vendored by llama-cpp-python 0.3.36 (the peer, commit 0c1e570),
# trimmed to what a CUDA build of llama-bench reads, carried as .whl/llamacpp-src.tar.xz (make it
# with `bash bench/llamacpp_peer.sh --pack` on a machine that can reach PyPI).
# Carry [".whl", "bench/models/tokenizer.gguf"]. Logs: $OUT/peer-<model>.log.
# NO_PEER=1: ouzel alone under the same instrument (no build, no llama-bench), e.g. to compare with
# an earlier call's llama.cpp figures; POST='cmd' runs cmd on each model's file ($M) after its runs.
set -uo pipefail
if [[ ${1:-} == --pack ]]; then  # here, not on the GPU: download the sdist, keep the build's sources
  d=$(mktemp -d)
  pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all: -d "$d" -q
  tar xzf "$d"/llama_cpp_python-0.3.36.tar.gz -C "$d"
  ex=(models docs media tests benches examples gguf-py tools/ui ggml/src/ggml-sycl ggml/src/ggml-vulkan
      ggml/src/ggml-opencl ggml/src/ggml-hexagon ggml/src/ggml-metal ggml/src/ggml-et)
  mkdir -p .whl
  tar cJf .whl/llamacpp-src.tar.xz -C "$d"/llama_cpp_python-0.3.36/vendor "${ex[@]/#/--exclude=llama.cpp/}" llama.cpp
  ls -la .whl/llamacpp-src.tar.xz
  exit 0
fi
source bench/device_env.sh
MODELS=${MODELS-"llama8b-q4km qwen3moe-30b-a3b-q4km ds4flash-l8-q2"}
mkdir -p /tmp/logs
for MODEL in $MODELS; do
  python3 bench/make_models.py $MODEL --out /tmp/m/$MODEL --tokenizer-from bench/models/tokenizer.gguf \
    > "/tmp/logs/$MODEL.make.log" 2>&1 &
done
t0=$(date +%s)
LC=/tmp/llama.cpp
if [[ ! ${NO_PEER:-} && ! -x $LC/build/bin/llama-bench ]]; then
  tar xJf .whl/llamacpp-src.tar.xz -C /tmp
  cmake -S $LC -B $LC/build -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF \
    -DCMAKE_BUILD_TYPE=Release > /tmp/logs/llamacpp-cmake.log 2>&1 || { tail -20 /tmp/logs/llamacpp-cmake.log; exit 1; }
  cmake --build $LC/build --target llama-bench -j "$(nproc)" > /tmp/logs/llamacpp-build.log 2>&1 \
    || { tail -30 /tmp/logs/llamacpp-build.log; exit 1; }
fi
echo "llama-bench built in $(( $(date +%s) - t0 )) s"
wait

peak() {  # run "$@", print the largest memory.used nvidia-smi saw meanwhile (MiB), less the idle value
  local idle; idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > /tmp/logs/smi.txt &
  local smi=$!
  "$@"
  kill $smi; wait $smi 2>/dev/null
  echo "peak GPU memory (nvidia-smi): $(( $(sort -n /tmp/logs/smi.txt | tail -1) - idle )) MiB above idle"
}
for MODEL in $MODELS; do
  M=/tmp/m/$MODEL/$MODEL.gguf
  L="$OUT/peer-$MODEL.log"
  echo "== $MODEL" | tee -a "$L"
  if [[ ! ${NO_PEER:-} ]]; then
    echo "-- llama.cpp pp512 / tg128" | tee -a "$L"
    peak timeout ${PEER_S:-150} $LC/build/bin/llama-bench -m $M -ngl 99 -fa 1 -r 3 -p 512 -n 128 2>&1 | tee -a "$L" \
      | grep -E "pp512|tg128|peak"
    echo "-- llama.cpp tg128 at depth 16384" | tee -a "$L"
    peak timeout ${PEER_S:-150} $LC/build/bin/llama-bench -m $M -ngl 99 -fa 1 -r 2 -p 0 -n 128 -d 16384 2>&1 \
      | tee -a "$L" | grep -E "tg128|peak"
  fi
  echo "-- ouzel pp512 / tg128" | tee -a "$L"
  peak timeout ${BENCH_S:-120} python3 -m ouzel bench -m $M --device cuda --pp 512 --tg 128 --runs 3 2>&1 \
    | tee -a "$L" | grep -E "pp-tg|peak"
  echo "-- ouzel walk to 16384" | tee -a "$L"
  peak timeout ${WALK_S:-150} python3 -m ouzel bench -m $M --device cuda --frontiers 16k --tg 64 2>&1 \
    | tee -a "$L" | grep -E "frontier|peak"
  if [[ ${POST:-} ]]; then
    M=$M timeout ${POST_S:-200} bash -c "$POST" 2>&1 | tee -a "$L" | tail -${POST_TAIL:-4}
  fi
  rm -f $M
done
