#!/usr/bin/env bash
# The headline runs of issue 7, one at a time (each takes the CPU lock): Beauty with the file's same-day order
# ("keep", ascending ASIN) and with shuffled ties, then REES46 and Taobao with the event-semantics table.
#   bash benchmarks/run_issue7.sh            # reports in runs/issue7/, the logs beside them
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# one thread a process: two processes on 2 cores then run at full speed instead of thrashing each other
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
B=../shared/data/amazon-beauty
R=runs/issue7
mkdir -p $R
lock() { flock /tmp/dragonrec-cpu.lock "$@"; }
ev() { lock .venv/bin/dragonrec evaluate --quiet "$@"; }

# the generative model with ASIN ties (resumes runs/gen/checkpoints when a run was interrupted)
[ -f runs/gen/report.json ] || lock .venv/bin/dragonrec train sft --data $B --out runs/gen >> runs/gen.log 2>&1
for ties in keep shuffle; do
  ev --data $B --recommender popularity --ties $ties --output $R/beauty-popularity-$ties.json
  ev --data $B --recommender cooccurrence --ties $ties --output $R/beauty-cooccurrence-$ties.json
done
lock .venv/bin/dragonrec train sft --data $B --out runs/gen-shuffle --ties shuffle > $R/gen-shuffle.log 2>&1
lock .venv/bin/python benchmarks/bench_candidates.py --data $B --model runs/gen/model --evaluate \
  --out benchmarks/results/candidates_beauty.json > $R/pipeline-keep.log 2>&1
lock .venv/bin/python benchmarks/bench_candidates.py --data $B --model runs/gen-shuffle/model --evaluate \
  --ties shuffle --out benchmarks/results/candidates_beauty_shuffled.json > $R/pipeline-shuffle.log 2>&1
for ties in keep shuffle; do
  lock .venv/bin/dragonrec train sft --data $B --recommender sasrec --out runs/sasrec-$ties --ties $ties \
    > $R/sasrec-$ties.log 2>&1
done
for d in rees46-multicat-head taobao-userbehavior-slice; do
  for m in popularity cooccurrence; do
    ev --data ../shared/data/$d --recommender $m --output $R/$d-$m.json
  done
  for m in sasrec generative; do
    lock .venv/bin/dragonrec train sft --data ../shared/data/$d --recommender $m --out runs/$d-$m \
      --set max_minutes=8 > $R/$d-$m.log 2>&1
  done
done
echo done > $R/DONE
