#!/usr/bin/env bash
# The headline runs of issue 7 in two lanes (each lane's jobs one at a time, one thread each, so that two jobs
# share 2 cores without thrashing): lane "gen" trains the generative models and evaluates the pipelines on
# them; lane "rest" runs the baselines, sasrec, and REES46 / Taobao. Reports land in runs/issue7/.
#   bash benchmarks/run_issue7.sh gen & bash benchmarks/run_issue7.sh rest &   (rest includes lane "other":
#   REES46 and Taobao, which also runs alone as `bash benchmarks/run_issue7.sh other`)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
B=../shared/data/amazon-beauty
R=runs/issue7
mkdir -p $R
lane=${1:?gen or rest}
lock() { flock /tmp/dragonrec-${LOCK:-$lane}.lock "$@"; }
ev() { lock .venv/bin/dragonrec evaluate --quiet "$@"; }

if [ "$lane" = gen ]; then
  # ASIN ties (resumes runs/gen/checkpoints when a run was interrupted), then shuffled ties
  [ -f runs/gen/report.json ] || lock .venv/bin/dragonrec train sft --data $B --out runs/gen >> runs/gen.log 2>&1
  [ -f runs/gen-shuffle/report.json ] || lock .venv/bin/dragonrec train sft --data $B --out runs/gen-shuffle --ties shuffle \
    > $R/gen-shuffle.log 2>&1
  lock .venv/bin/python benchmarks/bench_candidates.py --data $B --model runs/gen/model --evaluate \
    --out benchmarks/results/candidates_beauty.json > $R/pipeline-keep.log 2>&1
  lock .venv/bin/python benchmarks/bench_candidates.py --data $B --model runs/gen-shuffle/model --evaluate \
    --ties shuffle --out benchmarks/results/candidates_beauty_shuffled.json > $R/pipeline-shuffle.log 2>&1
elif [ "$lane" = rest ]; then
  for ties in keep shuffle; do
    ev --data $B --recommender popularity --ties $ties --output $R/beauty-popularity-$ties.json
    ev --data $B --recommender cooccurrence --ties $ties --output $R/beauty-cooccurrence-$ties.json
  done
  for ties in keep shuffle; do
    lock .venv/bin/dragonrec train sft --data $B --recommender sasrec --out runs/sasrec-$ties --ties $ties \
      > $R/sasrec-$ties.log 2>&1
  done
fi
if [ "$lane" = rest ] || [ "$lane" = other ]; then
  # REES46 and Taobao with the event-semantics table (sequence models with a short time budget each)
  for d in rees46-multicat-head taobao-userbehavior-slice; do
    for m in popularity cooccurrence; do
      ev --data ../shared/data/$d --recommender $m --output $R/$d-$m.json
    done
    for m in sasrec generative; do
      lock .venv/bin/dragonrec train sft --data ../shared/data/$d --recommender $m --out runs/$d-$m \
        --set max_minutes=${MAX_MINUTES:-3} > $R/$d-$m.log 2>&1
    done
  done
fi
echo done > $R/DONE-$lane
