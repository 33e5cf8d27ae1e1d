#!/bin/bash
# Does a converted backbone lose long context because it trains on short blocks?
# The 60% plan (attention analysis), same local initialisation, 30 healing steps of 1,024
# tokens each: 4 x 256 against 1 x 1024; both scored at 32 x 256 and 8 x 1024 (the same
# first 8,192 WikiText-2 tokens). A fixed step count, so a busy CPU changes the wall time only.
# Run: LISA_HUB_DATA_DIR=../shared/data benchmarks/context_length.sh   (~35 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
L=.venv/bin/lisa-hub
OUT=${OUT:-runs/context-length}
mkdir -p "$OUT"
C="--base smollm2-135m --fraction 0.6 --choose-by analysis --minutes 30 --max-steps 30"
$L convert $C --seq-len 256 --batch-size 4 --out "$OUT/s256" > "$OUT/s256.log" 2>&1
$L convert $C --seq-len 1024 --batch-size 1 --out "$OUT/s1024" > "$OUT/s1024.log" 2>&1
printf '| trained on | eval blocks | ppl | base ppl | ratio |\n|---|---|---|---|---|\n'
for shape in 256:32 1024:8; do
  len=${shape%:*}; n=${shape#*:}
  base=$($L eval-ppl --base smollm2-135m --blocks "$n" --block-len "$len" 2>/dev/null | tail -1)
  for b in s256 s1024; do
    got=$($L eval-ppl --base smollm2-135m --backbone "$OUT/$b" --blocks "$n" --block-len "$len" 2>/dev/null | tail -1)
    python3 -c "import json,sys; b,g=(json.loads(x)['perplexity'] for x in sys.argv[1:3]); \
print(f'| {sys.argv[3]} | {sys.argv[4]} | {g:.2f} | {b:.2f} | {g/b:.3f} |')" "$base" "$got" "$b" "$n x $len"
  done
done
