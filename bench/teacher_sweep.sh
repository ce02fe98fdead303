#!/usr/bin/env bash
# Teacher sweep (issue 8): how the kNN target's sharpness and weight change the memory decoder.
# Each row rebuilds only the kNN targets of a copy of an existing datastore (keys and index reused),
# then trains a full-copy decoder with the demo's budget and prints its joint validation perplexity.
#
#   bash bench/teacher_sweep.sh runs/demo/datastore runs/sweep "T0.25 0.25 0.5 none" "m8 1 0.5 8"
#
# Each row is "NAME T ALPHA TOP_M" (TOP_M "none" keeps every token). Results: OUT/results.txt.
set -euo pipefail
src=$1; out=$2; shift 2
mkdir -p "$out"
manifest="$src/manifest.json"
read -r model corpus max_tokens block stride < <(python3 -c "
import json; m=json.load(open('$manifest')); print(m['model'], m['corpus'], m['max_tokens'] or 0, m['block_size'], m['stride'])")
for row in "$@"; do
  set -- $row; name=$1; temp=$2; alpha=$3; top_m=$4
  ds="$out/ds-$name"; md="$out/md-$name"
  rm -rf "$ds" "$md"; cp -r "$src" "$ds"
  extra=(); [ "$top_m" != none ] && extra=(--top-m "$top_m")
  limit=(); [ "$max_tokens" != 0 ] && limit=(--max-tokens "$max_tokens")
  .venv/bin/memdec datastore --model "$model" --corpus "$corpus" "${limit[@]}" --block-size "$block" --stride "$stride" \
      --out "$ds" --knn-temp "$temp" "${extra[@]}" > "$out/ds-$name.log" 2>&1
  .venv/bin/memdec train --datastore "$ds" --out "$md" --alpha "$alpha" --batch-size 4 --block-size 512 --lr 2e-4 \
      --epochs 1 --warmup 2 --valid austen:valid --valid-max-tokens 2048 --eval-every 3 --save-every 3 > "$out/md-$name.log" 2>&1
  python3 -c "
import json; t=json.load(open('$md/memdec.json'))['train_stats']; m=json.load(open('$ds/manifest.json'))['steps']['targets']
print('$name T=$temp alpha=$alpha top_m=$top_m', 'mean_support=%.1f' % m['mean_support'],
      'joint_valid_ppl=%.2f' % t['best_ppl'], 'lambda=%s' % t['best_lambda'], 'alone=%.2f' % t['valid_ppl_memdec'])" \
      | tee -a "$out/results.txt"
done
