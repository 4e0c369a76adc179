#!/usr/bin/env bash
# After the verdict (docs/results.md, 2026-12-07 evening), exploratory and fixed before it ran:
# does a smaller LM weight keep CoT + LM (B) within the source budget of plain CoT (A)? On the
# TUNING split only (pseudo-target zoo unlabelled; sources recipes, shopping, travel; the
# held-out target market absent): (B) at LM weight 0.3 and 1, seed 100, 400 steps, the
# protocol's frozen code and flags, two at a time with one thread each, judged against the
# protocol's tuning run of (A) (zoo 0.375, sources 0.521). It informs compare's default
# --lm-weight; it does not touch the verdict, and no market number is made.
set -euo pipefail
S=/work/scratch/s26
OUT=${OUT:-/work/scratch/lmx}
export PYTHONPATH=$S/code:$S/site OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE TOKENIZERS_PARALLELISM=false
cd "$S/code"
for w in 0.3 1; do
  nice -n 5 python prada_fast/train.py --output-dir "$OUT/lm$w/seed100" --seed 100 --max-steps 400 \
    --teacher-steps 200 --eval-per-domain 16 --log-every 10 --target-domains zoo \
    --student smollm2-135m-l8 --teacher smollm2-135m --teacher-fit-cache "$S/proto3/teachers" \
    --no-progress --layer-probes --save-every 100 --keep-checkpoints 2 --teacher-seed 0 --data-seed 0 \
    --source-domains recipes,shopping,travel --data synthetic:400:shopping,market,travel,zoo,recipes \
    --prompt-len 0 --no-domain-loss --teacher-outputs "$S/smol-topk-story" --max-len 128 \
    --max-new-tokens 48 --lm-weight "$w" --overwrite > "$OUT/lm$w.log" 2>&1 &
done
wait
for w in 0.3 1; do
  python - "$OUT/lm$w/seed100/summary.json" "$w" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))["domains"]
src = [v["accuracy_after"] for k, v in d.items() if v["role"] == "source"]
print(f"LM weight {sys.argv[2]}: pseudo-target zoo {d['zoo']['accuracy_after']:.3f}, "
      f"sources {sum(src) / len(src):.3f} (plain CoT on this split: zoo 0.375, sources 0.521)")
PY
done
