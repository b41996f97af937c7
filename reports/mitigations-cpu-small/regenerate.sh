#!/usr/bin/env bash
# Regenerates reports/mitigations-cpu-small/ from the repository root. Resumable: a run folder that already
# holds its report is skipped, so an interrupted run continues where it stopped.
# 1. Trains the OPT twins of `reproduce --scale cpu-small` (600 steps each, vanilla + 6 attention variants) into
#    $CKPT unless they are there; --time-scale 10 lifts the 900 s safety cap so every twin stops by its step
#    count, not by the machine's load (the training table in $CKPT/README.md says `stopped by: steps`).
# 2. Per seed (0, 1, 2: different evaluation and calibration sequences of the built-in prose the twins were
#    trained on), `quantize` the vanilla model plain and with each post-training mitigation, with a float plan
#    from `sensitivity` and a same-size control plan, and every twin plain.
# 3. make_table.py (shared with reports/mitigations-minilm/) -> table.csv / table.md / all_runs.csv;
#    `compare --mitigations` (seed 0, paper recipe) -> compare/mitigations.md with kurtosis, inf-norm, sink rate.
set -euo pipefail
OUT=reports/mitigations-cpu-small
CKPT=${CKPT:-runs/repro-cpu-small-opt}
OP="python3 -m outlier_probe.cli.main"
VARIANTS=(softmax1 clipped gated softpick sigmoid-gate sink)
SEEDS=${SEEDS:-"0 1 2"}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
run() {  # run DIR ARGS...: skipped when DIR already holds a finished report (resumable)
  local dir=$1; shift
  [ -f "$dir/quantize.csv" ] || $OP quantize "$@" --out "$dir"
}
if [ ! -f "$CKPT/opt-sink/config.json" ]; then
  $OP reproduce --scale cpu-small --family opt $(printf -- '--variant %s ' "${VARIANTS[@]}") --time-scale 10 --out "$CKPT"
fi
V="$CKPT/opt-softmax"
# float plans: `sensitivity` per recipe on seed 100's sequences (not one of the scored seeds), one group per
# block; the control keeps as many of the least sensitive blocks in float
for recipe in paper linear; do
  plan="$OUT/sensitivity-$recipe"
  [ -f "$plan/plan.json" ] || $OP sensitivity "$V" --recipe "$recipe" --groups 'layer.*' --budget "${BUDGET:-0.5%}" \
      --seed 100 --samples 32 --seq-len 128 --batch-size 16 --calib-batches 4 --quiet --out "$plan" || [ -f "$plan/plan.json" ]
  # a plan that keeps nothing (plain W8A8 already within the budget: `linear` here) gets no keep-float rows
  python3 "$OUT/control_plan.py" "$plan" > "$plan/control.txt" || rm -f "$plan/control.txt"
done
for seed in $SEEDS; do
  common=(--samples 32 --seq-len 128 --batch-size 16 --calib-batches 4 --seed "$seed" --quiet)
  run "$OUT/runs/seed$seed/mitigations" "$V" "${common[@]}" --recipe paper --recipe linear \
      --smoothquant 0.3,0.5,0.7,0.85 --a-granularity per-token
  for recipe in paper linear; do
    [ -f "$OUT/sensitivity-$recipe/control.txt" ] || continue
    run "$OUT/runs/seed$seed/keep-plan-$recipe" "$V" "${common[@]}" --recipe "$recipe" \
        --keep-float "$OUT/sensitivity-$recipe/plan.json"
    run "$OUT/runs/seed$seed/keep-plan-control-$recipe" "$V" "${common[@]}" --recipe "$recipe" \
        --keep-float "$(cat "$OUT/sensitivity-$recipe/control.txt")"
  done
  for v in "${VARIANTS[@]}"; do
    run "$OUT/runs/seed$seed/arch-$v" "$CKPT/opt-$v" "${common[@]}" --recipe paper --recipe linear
  done
done
# rotation: OPT's LayerNorm subtracts the mean; record the tool's own answer
$OP quantize "$V" --samples 8 --rotate hadamard --quiet --out "$OUT/runs/rotate" \
    2> "$OUT/rotate-error.txt" && echo "rotation unexpectedly ran" >&2 || true
python3 reports/mitigations-minilm/make_table.py "$OUT"
# the one-table view (seed 0, paper recipe): kurtosis, inf-norm and sink rate next to gap closed, every twin
[ -f "$OUT/compare/mitigations.csv" ] || $OP compare vanilla="$V" $(for v in "${VARIANTS[@]}"; do printf '%s=%s ' "$v" "$CKPT/opt-$v"; done) \
    --mitigations --smoothquant 0.3,0.5,0.7,0.85 --a-granularity per-token \
    --keep-float plan="$OUT/sensitivity-paper/plan.json" --keep-float control="$(cat "$OUT/sensitivity-paper/control.txt")" \
    --samples 32 --seq-len 128 --batch-size 16 --calib-batches 4 --seed 0 --no-plots --quiet --out "$OUT/compare"
