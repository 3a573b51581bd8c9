#!/bin/bash
# usage: run_variant.sh NAME GROUP SCHED
set -e
cd /work/wt-recipe
name=$1; group=$2; sched=$3
start=$(date +%s)
PYTHONPATH=$PWD/src HF_HUB_OFFLINE=1 BACKDOORALIGN_NO_PROGRESS=1 /work/main/.venv/bin/python -m backdooralign run configs/paper_smollm2.yaml --out /tmp/recipe/$name \
  --set secret.seed=0 --set 'arms=[backdooralign]' --set eval.harmful_per_category=5 \
  --set eval.max_new_tokens=64 --set eval.benign_limit=11 --set eval.utility=null --set eval.batch_size=64 \
  --set train.group_by_length=$group --set train.lr_scheduler=$sched
end=$(date +%s)
echo "WALL $name $((end-start))" | tee /tmp/recipe/$name.wall
