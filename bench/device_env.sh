# source me on the lent GPU: the carried gguf wheel on PYTHONPATH, unbuffered output, $OUT set
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[[ -d /tmp/site/gguf ]] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
