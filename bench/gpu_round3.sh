#!/usr/bin/env bash
# GPU round three (issue 28): the three questions in priority order, cheapest first, within one budget.
#
#   Q3  shapes and router on a GPU: gpu_inference.py, random Llamas of GPT-2's sizes (xl, small, large, medium),
#       separate (GPT-2-small-sized), fork:6 and lora:16@6; scoring 8×1024, greedy decoding b1 and b8 (eager
#       and fast), a random TokenRouter's cost (scoring, eager decoding b1).             budget Q3_S (300 s)
#   Q2  scoring at GPT-2 xl: the separate GPT-2-small decoder as is, torch.compile'd, and fed 32 rows at
#       once (the base 8 at a time); kNN-LM retrieval at 1M keys beside it (the shared-trunk shape at xl
#       is Q3's fork:6 scoring row).                                                    budget Q2_S (120 s)
#   Q1  the kNN teacher: teacher2.py on both domains at 300k tokens, α ∈ {0, 0.25, 0.5} × decoders copy,
#       fork:8, lora:16@8 × keys from the base and from a DAPT teacher; rows in priority order, whatever
#       the budget leaves (TOTAL_S minus what Q3 and Q2 used).
#
# Every script writes its rows as they finish (JSON / JSON lines), so a cut run keeps what it measured;
# each question also runs under `timeout` at its budget + GRACE_S, as the scripts start no row after
# their --budget-s but finish the one under way.
#
#   bash bench/gpu_round3.sh                       # the GPU run: OUT=runs/round3, TOTAL_S=540 (one call: at most 600 s)
#   SMOKE=1 bash bench/gpu_round3.sh               # all three at tiny sizes on the CPU (~2-3 minutes)
#   QUESTIONS="1" TOTAL_S=540 bash bench/gpu_round3.sh   # one question only (a later session)
#
# Environment: PY (python; default .venv/bin/python where it exists, else python3), OUT, TOTAL_S, QUESTIONS
# (order, default "3 2 1"), Q3_S, Q2_S, GRACE_S, MODEL (Q1's base, default smollm2-135m), GGUF_PARTS (a glob
# of the SmolLM2 GGUF's parts, e.g. "/tmp/smollm2.gguf.part-*": joined in name order into $OUT/smollm2.gguf,
# which then is MODEL), EXTRA_PYTHONPATH (e.g. a transformers wheel unpacked in /tmp/site, as in round two).
set -u
cd "$(dirname "$0")/.."
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
SMOKE=${SMOKE:-0}
OUT=${OUT:-$([ "$SMOKE" = 1 ] && echo /tmp/round3-smoke || echo runs/round3)}
TOTAL_S=${TOTAL_S:-$([ "$SMOKE" = 1 ] && echo 175 || echo 540)}
QUESTIONS=${QUESTIONS:-"3 2 1"}
Q3_S=${Q3_S:-$([ "$SMOKE" = 1 ] && echo 60 || echo 300)}
Q2_S=${Q2_S:-$([ "$SMOKE" = 1 ] && echo 30 || echo 120)}
GRACE_S=${GRACE_S:-$([ "$SMOKE" = 1 ] && echo 30 || echo 60)}
MODEL=${MODEL:-smollm2-135m}
export PYTHONPATH="${EXTRA_PYTHONPATH:+$EXTRA_PYTHONPATH:}src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
START=$(date +%s)
left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
log() { echo "[round3 $(date +%H:%M:%S), $(( $(date +%s) - START )) s] $*" | tee -a "$OUT/round3.log"; }

if [ -n "${GGUF_PARTS:-}" ] && [ "$SMOKE" != 1 ]; then  # the GGUF travels in two ~49 MB parts
    cat $GGUF_PARTS > "$OUT/smollm2.gguf.tmp" && mv "$OUT/smollm2.gguf.tmp" "$OUT/smollm2.gguf" && MODEL="$OUT/smollm2.gguf"
    log "joined $(ls $GGUF_PARTS | wc -l) parts into $MODEL ($(stat -c %s "$MODEL") bytes)"
fi

if [ "$SMOKE" = 1 ]; then
    DEV=(--device cpu)
    Q3=(--llama-sizes --sizes tiny --decoder separate --decoder fork:1 --decoder lora:4@1 --router
        --score-batch 2 --score-len 64 --new-tokens 4 --batches 1 --reps 1 --prompt-len 8 --knn-keys)
    Q2=(--sizes tiny --decoder-score-batch 4 --score-batch 2 --score-len 64 --batches --reps 1
        --knn-keys 20000 --knn-k 64 --knn-score-queries 16)  # --compile: ~50 s on 2 CPU cores, run apart
    # the copy rows are the original code path (checked apart: bench/teacher2.py --smoke --decoder copy ...)
    Q1=(--smoke --domain austen --rows ce a0.5 --decoder lora:4@1 --key-model base dapt)
else
    DEV=(--device cuda)
    Q3=(--llama-sizes --sizes xl small large medium --decoder separate --decoder fork:6 --decoder lora:16@6
        --router --router-batches 1 --reps 2 --knn-keys)
    Q2=(--sizes xl --compile --decoder-score-batch 32 --batches --knn-keys 1e6)
    Q1=(--model "$MODEL" --domain austen stdlib --train-tokens 300000 --index torch --rows ce a0.25 a0.5
        --decoder copy --decoder fork:8 --decoder lora:16@8 --key-model base dapt)
fi

run_q() {  # question, budget seconds, command...
    local q=$1 budget=$2; shift 2
    if [ "$budget" -lt 10 ]; then log "Q$q skipped: $budget s left of TOTAL_S=$TOTAL_S"; return; fi
    log "Q$q: budget $budget s: $*"
    local t0; t0=$(date +%s)
    timeout --signal=INT --kill-after=20 $(( budget + GRACE_S )) "$@" > "$OUT/q$q.log" 2>&1
    log "Q$q: exit $? after $(( $(date +%s) - t0 )) s (output $OUT/q$q.log)"
}

for q in $QUESTIONS; do
    case $q in
        3) b=$(( $(left) < Q3_S ? $(left) : Q3_S ))
           run_q 3 "$b" "$PY" bench/gpu_inference.py "${DEV[@]}" "${Q3[@]}" --budget-s "$b" --out "$OUT/q3.json" ;;
        2) b=$(( $(left) < Q2_S ? $(left) : Q2_S ))
           run_q 2 "$b" "$PY" bench/gpu_inference.py "${DEV[@]}" "${Q2[@]}" --budget-s "$b" --out "$OUT/q2.json" ;;
        1) b=$(( $(left) - GRACE_S ))
           run_q 1 "$b" "$PY" bench/teacher2.py "${DEV[@]}" "${Q1[@]}" --budget-s "$b" --work "$OUT/q1" \
               --out-jsonl "$OUT/q1/rows.jsonl" ;;
        *) log "unknown question $q (1, 2 or 3)" ;;
    esac
done
log "done: $(( $(date +%s) - START )) s in all; rows in $OUT (q3.json, q2.json, q1/rows.jsonl, q1/rows.md)"
