#!/usr/bin/env bash
# The SmolLM2-135M-Instruct grid, one stage per call; every stage resumes (finished runs are stored
# in bench/results/*.json and skipped). What each option and stored field is: docs/benchmarks.md, part (a).
#
#   bash bench/smollm2_grid.sh sweep      # 0. learning rates on the validation split
#   bash bench/smollm2_grid.sh lrs        #    print the chosen LRs (--lr-report)
#   bash bench/smollm2_grid.sh sweep_int2 #    QA-LoRA / QA-BLoRA LRs at INT2 g32 (val; step 1 keeps INT3's choice)
#   bash bench/smollm2_grid.sh int2_lrs   #    -> bench/results/smollm2_int2_lrs.txt
#   bash bench/smollm2_grid.sh int2       #    QA pair at INT2 g32 with INT2's own LRs (accuracy_smollm2_int2_lr.json)
#   bash bench/smollm2_grid.sh sweep_qat_int2  # QLoRA + QAT's LR at INT2 g32 (val): the baseline's own INT2 LR
#   bash bench/smollm2_grid.sh step1      # 1. INT3 / INT2 g32, 4 methods, 3 seeds, references
#   bash bench/smollm2_grid.sh step2      # 2. INT4 g32 / g64 (same file)
#   bash bench/smollm2_grid.sh step3      # 3. QLoRA / Q-BLoRA trained with QAT, INT3 / INT2 g32 (same file)
#   bash bench/smollm2_grid.sh step4      # 4. budget rank 32 (accuracy_smollm2_r32.json; ALPHA=64: _r32_a64)
#   bash bench/smollm2_grid.sh step5      # 5. budget rank 9, the paper's geometry (accuracy_smollm2_r9.json; ALPHA=18: _r9_a18)
#   bash bench/smollm2_grid.sh sweep_base # issue 32: QA-* LRs on a calibrated base (BASE=gptq|mse, BITS=3|2; val split;
#                                         #   SCALE_RANK=4: with learned group scales, in files of their own)
#   bash bench/smollm2_grid.sh step6      # issue 32: QA-* on a calibrated base, test split (accuracy_smollm2_$BASE.json)
#   bash bench/smollm2_grid.sh step7      # the users' pipeline: QLoRA -> merge -> llm-compressor GPTQ (qlora+libgptq
#                                         #   rows, accuracy_smollm2_libgptq.json; needs scripts/setup_library_gptq_venv.sh)
#   bash bench/smollm2_grid.sh report     #    tables + plots, and docs/results/README.md's grid block
#
# THREADS (default 1) sets OMP_NUM_THREADS: two stages may share the 2 cores of this machine.
# SEEDS (default "0 1 2") sets the seeds of steps 2-5, e.g. `SEEDS=0 bash bench/smollm2_grid.sh step2`
# to cover every step at seed 0 before adding seeds 1 and 2 (a later call with more seeds adds them).
# METHODS (default: all four) narrows steps 2, 4 and 5, e.g. `METHODS="qalora qablora" SEEDS=0 bash
# bench/smollm2_grid.sh step4` runs the comparison step 4 exists for first; a later call adds the rest.
# ALPHA (default: the strategies' 16) sets the LoRA scaling numerator of steps 4 and 5 (s = ALPHA / rank),
# in its own file: `ALPHA=64 bash bench/smollm2_grid.sh step4` -> accuracy_smollm2_r32_a64.json keeps rank 8's
# s = 2 at rank 32, `ALPHA=18` the same at rank 9 (docs/benchmarks.md (a), the scaling confound).
# Steps 4 and 5 score QLoRA / Q-BLoRA's trained NF4 + adapter on ARC / MMLU too (the Q-BLoRA >= QLoRA claim
# at that rank); a run stored before they did gets them from its kept adapter on the next call, without training.
# The same stage started twice (e.g. `bash bench/smollm2_grid.sh step1 &` twice) splits its runs
# between the two processes, one per core (bench/accuracy.py's ResultsStore).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${THREADS:-1}
MODEL=$(python scripts/fetch_smollm2.py --quiet)
D=${DATA_DIR:-../shared/data}
STEPS=${STEPS:-200}
SEEDS=${SEEDS:-0 1 2}
METHOD_ARGS=(--methods ${METHODS:-qlora qblora qalora qablora})
ALPHA_ARGS=(${ALPHA:+--alpha "$ALPHA"})
SUFFIX=${ALPHA:+_a$ALPHA}
COMMON=(--model "$MODEL" --data "$D/alpaca_5000.json" --prompt-template chat --max-source-length 128
        --max-target-length 128 --batch-size 4 --eval-batch-size 8 --steps "$STEPS" --warmup 10 --no-exact-match)
BENCH=(--arc "$D/arc/ARC-Easy-Test.jsonl" --arc-limit 1000 --mmlu-dir "$D/mmlu" --mmlu-k-shot 5
       --mmlu-limit-per-subject 10)
LR_FILE=bench/results/smollm2_lrs.txt   # one line: --method-lr qlora=... qblora=... qalora=... qablora=...
INT2_LR_FILE=bench/results/smollm2_int2_lrs.txt   # one line: --method-lr qalora=... qablora=... (INT2 g32's sweep)

INT2_SWEEP='bench/results/accuracy_smollm2_val_int2_qa[0-9]*.json'   # sweep_int2's files, not sweep_qat_int2's (expanded where used)

# write_lrs FILE SWEEP_JSON...: print --lr-report over the sweep files and keep its --method-lr line in FILE
write_lrs() {
  local file=$1; shift
  python bench/accuracy.py --lr-report "$@" | tee /dev/stderr | grep -- "--method-lr" \
      | sed 's/^for the test runs: //' > "$file"
  cat "$file"
}

case "${1:?stage: sweep | lrs | sweep_int2 | int2_lrs | int2 | sweep_qat_int2 | step1 | step2 | step3 | step4 | step5 | report}" in
  sweep)
    for pair in "1e-3 1e-2" "3e-4 3e-3" "3e-3 3e-2"; do set -- $pair
      python bench/accuracy.py "${COMMON[@]}" --eval-split val --seeds 0 --bits 3 --group-sizes 32 \
          --lr "$1" --qa-lr "$2" --bench-trained none --tag "smollm2_val_lr$1"
    done
    # QA-LoRA and QA-BLoRA were both best at 3e-3, the grid's low end: one more factor-3 step down
    python bench/accuracy.py "${COMMON[@]}" --eval-split val --seeds 0 --bits 3 --group-sizes 32 \
        --methods qalora qablora --lr 3e-4 --qa-lr 1e-3 --bench-trained none --tag smollm2_val_lr_qa1e-3 ;;
  sweep_int2)   # QA-BLoRA trails QA-LoRA at INT2 only: does INT2 want another LR than INT3's choice? (val split)
    for lr in 1e-3 3e-3 1e-2 3e-2; do
      python bench/accuracy.py "${COMMON[@]}" --eval-split val --seeds 0 --bits 2 --group-sizes 32 \
          --methods qalora qablora --qa-lr "$lr" --bench-trained none --tag "smollm2_val_int2_qa$lr"
    done
    python bench/accuracy.py --lr-report $INT2_SWEEP ;;
  sweep_qat_int2)   # step 3's QLoRA + QAT trains at the NF4 LR; the QA pair's INT2 runs got INT2's own (above)
    for lr in 1e-3 3e-3 1e-2 3e-4; do   # 3e-4 last: 1e-3 chose at the low end of 1e-3..1e-2
      python bench/accuracy.py "${COMMON[@]}" --eval-split val --seeds 0 --methods qlora --qat-only --qat-bits 2 \
          --group-sizes 32 --lr "$lr" --bench-trained none --tag "smollm2_val_int2_qat_lr$lr"
    done
    python bench/accuracy.py --lr-report bench/results/accuracy_smollm2_val_int2_qat_lr*.json --lr-criterion deployed ;;
  int2_lrs)
    write_lrs "$INT2_LR_FILE" $INT2_SWEEP ;;
  int2)   # step 1's INT2 g32 QA pair again, each at the LR INT2's own validation sweep chose
    python bench/accuracy.py "${COMMON[@]}" "${BENCH[@]}" $(cat "$INT2_LR_FILE") --tag smollm2_int2_lr \
        --seeds $SEEDS --methods qalora qablora --bits 2 --group-sizes 32 --bench-trained none ;;
  lrs)
    write_lrs "$LR_FILE" bench/results/accuracy_smollm2_val_lr*.json ;;
  step1)
    python bench/accuracy.py "${COMMON[@]}" "${BENCH[@]}" $(cat "$LR_FILE") --tag smollm2 --seeds 0 1 2 \
        --bits 3 2 --group-sizes 32 --reference --bench-trained nf4 ;;
  step2)
    python bench/accuracy.py "${COMMON[@]}" "${BENCH[@]}" $(cat "$LR_FILE") --tag smollm2 --seeds $SEEDS \
        "${METHOD_ARGS[@]}" --bits 4 --group-sizes 32 64 --reference --bench-trained none ;;
  step3)
    python bench/accuracy.py "${COMMON[@]}" "${BENCH[@]}" $(cat "$LR_FILE") --tag smollm2 --seeds $SEEDS \
        --methods qlora qblora --qat-only --qat-bits 3 2 --group-sizes 32 --bench-trained none ;;
  step4)
    python bench/accuracy.py "${COMMON[@]}" "${BENCH[@]}" $(cat "$LR_FILE") --tag "smollm2_r32$SUFFIX" --rank 32 \
        "${ALPHA_ARGS[@]}" --seeds $SEEDS "${METHOD_ARGS[@]}" --bits 3 2 --group-sizes 32 --bench-trained nf4 ;;
  step5)   # budget rank 9: at g32 SmolLM2 then has the paper's LLaMA-7B r64 geometry (docs/benchmarks.md (a) step 5)
    python bench/accuracy.py "${COMMON[@]}" "${BENCH[@]}" $(cat "$LR_FILE") --tag "smollm2_r9$SUFFIX" --rank 9 \
        "${ALPHA_ARGS[@]}" --seeds $SEEDS "${METHOD_ARGS[@]}" --bits 3 2 --group-sizes 32 --bench-trained nf4 ;;
  sweep_base)   # issue 32: the base changed, so its LR is chosen again on the validation split (seed 0)
    for lr in ${LRS:-3e-3 1e-3 1e-2}; do
      python bench/accuracy.py "${COMMON[@]}" --eval-split val --seeds 0 --bits "${BITS:-3}" --group-sizes 32 \
          "${METHOD_ARGS[@]}" --base-init "${BASE:-gptq}" --qa-lr "$lr" --bench-trained none \
          ${SCALE_RANK:+--scale-rank "$SCALE_RANK"} --tag "smollm2_val_${BASE:-gptq}_int${BITS:-3}${SCALE_RANK:+_s$SCALE_RANK}_qa$lr"
    done
    python bench/accuracy.py --lr-report bench/results/accuracy_smollm2_val_${BASE:-gptq}_int${BITS:-3}${SCALE_RANK:+_s$SCALE_RANK}_qa*.json ;;
  step6)   # issue 32: QA-LoRA / QA-BLoRA on a calibrated base (and the references on it); LRs from sweep_base
    # SCALE_RANK=4: with learned group scales, in a file of its own (no references: step6's own file has them)
    python bench/accuracy.py "${COMMON[@]}" "${BENCH[@]}" ${QA_LRS:?set QA_LRS to sweep_base\'s --method-lr line} \
        --tag "smollm2_${BASE:-gptq}${SCALE_RANK:+_s$SCALE_RANK}" --seeds $SEEDS "${METHOD_ARGS[@]}" \
        --base-init "${BASE:-gptq}" --bits ${BITS:-3 2} --group-sizes 32 --bench-trained none \
        $( [ -n "${SCALE_RANK:-}" ] && echo --scale-rank "$SCALE_RANK" || echo --reference ) ;;
  step7)   # QLoRA at the grid's LR, merged, then quantized by llm-compressor's GPTQ at INT3 g32 (and by RTN)
    python bench/accuracy.py "${COMMON[@]}" "${BENCH[@]}" $(cat "$LR_FILE") --tag smollm2_libgptq --seeds $SEEDS \
        --methods qlora --library-gptq --bits ${BITS:-3} --group-sizes 32 --bench-trained none ;;
  report)
    python bench/accuracy.py "${COMMON[@]}" "${BENCH[@]}" $(cat "$LR_FILE") --tag smollm2 --bits 3 2 \
        --group-sizes 32 --report-only --markdown
    python bench/smollm2_grid_table.py > /dev/null ;;   # docs/results/README.md's grid block
  *) echo "unknown stage $1" >&2; exit 2 ;;
esac
