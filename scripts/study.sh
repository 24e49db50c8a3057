#!/usr/bin/env bash
# docs/results.md, end to end: 4 heads x 10 seeds x 4 folds, the target-scaling sweep
# (6 heads x none/standard/minmax[0,1]/minmax[-1,1], same seeds and folds), then both reports.
# Seeds run as vectorized replicas (replica r of a job is seed r), and the jobs of each sweep
# as fused fits. Usage: scripts/study.sh [DIR [OVERRIDES...]], e.g. fuse.enabled=false to time
# it unfused (docs/speed.md).
set -euo pipefail
out=${1:-multirun/study}
shift || true
repeat=(model.replicas=10 data.num_folds=4 'data.fold=range(4)' callbacks.progress_bar.refresh_rate=0 "$@")
heads=none,relu,softplus,leaky_relu,sigmoid,tanh

python -m housing_reg.train -m head=relu,none,sigmoid,tanh "${repeat[@]}" \
    hydra.sweep.dir="$out/heads"
python -m housing_reg.train -m head=$heads data.target_scaling=none,standard "${repeat[@]}" \
    hydra.sweep.dir="$out/scaling/none_standard"
python -m housing_reg.train -m head=$heads data.target_scaling=minmax \
    'data.target_range=[0,1],[-1,1]' "${repeat[@]}" hydra.sweep.dir="$out/scaling/minmax"

python -m housing_reg.report "$out/heads"
python -m housing_reg.report "$out/scaling"
