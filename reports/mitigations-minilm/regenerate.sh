#!/usr/bin/env bash
# Regenerates reports/mitigations-minilm/ (38 minutes wall on the shared 2-core machine). Run from the repository root.
# The real all-MiniLM-L6-v2 (built-in `minilm`), WikiText-2 raw test text, 32 x 128-token sequences per seed,
# calibration on the 4 x 8 sequences after them; seeds 0, 1, 2 draw different sequences.
#
# Architecture rows: fine-tuned MiniLM twins (issue 13's `retrofit`: a vanilla control fine-tuned the same way,
# softmax1, clipped, gated), one `NAME=PATH` per line in $TWINS (default /work/notes/retrofit-twins.txt; a line
# that is only a PATH is named after its folder). Each twin is quantized plain per seed into
# runs/seed*/arch-retrofit-NAME and gets a row in the table; compare-twins/ holds their kurtosis / inf-norm /
# sink rate next to the original's (seed 0, paper recipe).
#   ARCH_ONLY=1 bash reports/mitigations-minilm/regenerate.sh   # only the architecture rows (+ table), ~1.5 min
#                                                              # per twin and seed; SEEDS="0" for one seed
set -euo pipefail
DATA=${DATA:-../shared/data/wikitext-2-raw/wiki.test.raw}
OUT=reports/mitigations-minilm
OP="python3 -m outlier_probe.cli.main"
SEEDS=${SEEDS:-"0 1 2"}
TWINS=${TWINS:-/work/notes/retrofit-twins.txt}
run() {  # run DIR ARGS...: skipped when DIR already holds a finished report (resumable)
  local dir=$1; shift
  [ -f "$dir/quantize.csv" ] || $OP quantize "$@" --out "$dir"
}
twins() {  # NAME=PATH per line of $TWINS (blank lines and # comments skipped)
  [ -f "$TWINS" ] || return 0
  grep -v '^\s*\(#\|$\)' "$TWINS" | while read -r line; do
    case "$line" in *=*) echo "$line" ;; *) echo "$(basename "$line")=$line" ;; esac
  done
}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
for seed in $SEEDS; do
  common=(--data "$DATA" --samples 32 --seq-len 128 --seed "$seed" --quiet)
  if [ -z "${ARCH_ONLY:-}" ]; then
    # plain W8A8 of both recipes, a SmoothQuant sweep and per-token activations
    run "$OUT/runs/seed$seed/mitigations" minilm "${common[@]}" --recipe paper --recipe linear \
        --smoothquant 0.3,0.5,0.7,0.85 --a-granularity per-token
    # float plan: the FFN output projections (weights and activations; the lowest-SQNR points) kept in float ...
    run "$OUT/runs/seed$seed/keep-ffn-down" minilm "${common[@]}" --recipe paper --recipe linear \
        --keep-float 'encoder.layer.*.output.dense'
    # ... against a control that keeps as many well-behaved modules (the query projections) in float
    run "$OUT/runs/seed$seed/keep-query-control" minilm "${common[@]}" --recipe paper --recipe linear \
        --keep-float 'encoder.layer.*.attention.self.query'
  fi
  # architecture rows: each fine-tuned twin, plain W8A8 (gap closed against the original MiniLM's plain loss)
  for twin in $(twins); do
    run "$OUT/runs/seed$seed/arch-retrofit-${twin%%=*}" "${twin#*=}" "${common[@]}" --recipe paper --recipe linear
  done
done
if [ -z "${ARCH_ONLY:-}" ]; then
  # rotation: BERT-style post-norm blocks cannot be rotated; record the tool's own answer
  $OP quantize minilm --data "$DATA" --samples 8 --rotate hadamard --quiet --out "$OUT/runs/rotate" \
      2> "$OUT/rotate-error.txt" && echo "rotation unexpectedly ran" >&2 || true
fi
python3 "$OUT/make_table.py" "$OUT"
if [ -z "${ARCH_ONLY:-}" ]; then
  # the one-table view (seed 0, paper recipe): kurtosis, inf-norm and sink rate next to gap closed
  [ -f "$OUT/compare/mitigations.csv" ] || $OP compare minilm --mitigations --smoothquant 0.3,0.5 --a-granularity per-token \
      --data "$DATA" --samples 32 --seq-len 128 --seed 0 --no-plots --quiet --out "$OUT/compare"
fi
# the twins' own figures next to the original's (seed 0, paper recipe)
if [ -n "$(twins)" ] && [ ! -f "$OUT/compare-twins/compare.csv" ]; then
  $OP compare original=minilm $(for t in $(twins); do echo "retrofit-$t"; done) \
      --data "$DATA" --samples 32 --seq-len 128 --seed 0 --no-plots --quiet --out "$OUT/compare-twins"
fi
