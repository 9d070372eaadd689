#!/usr/bin/env bash
# The paper-protocol runs behind README "Results": early stopping on valid AUC with
# patience 2, the official MovieLens hyper-parameters (configs/ml100k.toml, configs/ml1m.toml),
# the best checkpoint evaluated on test (and valid) with per-sample predictions, then the
# report: results.md, calibration (LogLoss after maps fitted on valid), Table 5, figures.
#
#   ./launchers/reproduce.sh ml100k              # GenCI, DeepFM, DCNv2, DIN on ML-100K
#   ./launchers/reproduce.sh ml100k-ablations    # the four Table 4 ablations of GenCI
#   ./launchers/reproduce.sh ml1m                # GenCI, DeepFM, DCNv2, DIN on ML-1M
#   MODELS="deepfm din" ./launchers/reproduce.sh ml1m
#
# Knobs: REPORT_ONLY=1 (train nothing: rewrite results.md, the volatility table and GenCI's
# figures from the set's finished runs), RUNS (default runs/repro), NPROC (default 1, the
# setting the recorded tables used; NPROC=2 = 2 ranks × 1 thread, measured 1.3x faster for
# GenCI on ML-1M on 2026-11-23 — README "Speed"), JOBS
# (default 1; JOBS=2 trains two models side by side with one thread each — GenCI gains little
# from a second thread, README "Speed"), EXTRA (more config overrides for every run). Each
# run resumes from its latest checkpoint if interrupted (checkpoint.resume = auto), so
# re-running the same command continues.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
./launchers/install.sh >/dev/null
export PATH="${GENCI_VENV:-$root/.venv}/bin:$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# torchrun restarts (--max-restarts) need a fresh rendezvous store per round, or the restarted
# ranks die in init_process_group on the dead ranks' addresses (pytorch/pytorch#135712)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
what="${1:?usage: reproduce.sh ml100k|ml100k-ablations|ml1m}"
RUNS="${RUNS:-runs/repro}"
NPROC="${NPROC:-1}"
JOBS="${JOBS:-1}"
EXTRA="${EXTRA:-}"

case "$what" in
  ml100k) config=configs/ml100k.toml; data=data/ml-100k; dataset=ml-100k
          runs=(${MODELS:-genci deepfm dcnv2 din}) ;;
  ml100k-ablations) config=configs/ml100k.toml; data=data/ml-100k; dataset=ml-100k
          runs=(${MODELS:-genci-no_st genci-no_lt genci-no_sr genci-no_ntp}) ;;
  ml1m) config=configs/ml1m.toml; data=data/ml-1m; dataset=ml-1m
        runs=(${MODELS:-deepfm dcnv2 din genci}) ;;
  *) echo "unknown set $what" >&2; exit 2 ;;
esac

if [ ! -f "$data/manifest.json" ]; then
  genci-prepare --dataset "$dataset" --out "$data"
fi
if [ ! -f "$data/semantic_ids.parquet" ]; then
  genci-tokenize --data "$data" --config "$config"
fi

overrides_for() {  # run name → model overrides
  case "$1" in
    genci-no_st) echo "--model.name genci --model.use_st_intent false" ;;
    genci-no_lt) echo "--model.name genci --model.use_lt_intent false" ;;
    genci-no_sr) echo "--model.name genci --model.use_sr false" ;;
    genci-no_ntp) echo "--model.name genci --model.use_ntp false" ;;
    *) echo "--model.name $1" ;;
  esac
}

out="$RUNS/$what"
run_one() {  # train one model to early stopping, then evaluate its best checkpoint
  local name="$1" run="$out/$1" t0
  # shellcheck disable=SC2046
  local args=(--config "$config" $(overrides_for "$name") --train.run_dir "$run"
              --train.progress_bar false $EXTRA)
  t0=$(date +%s)
  if [ "$NPROC" -gt 1 ]; then
    # a rank that dies is restarted once; the run resumes from its last checkpoint
    torchrun --standalone --nproc_per_node="$NPROC" --max-restarts=1 -m genci_dist.train \
      "${args[@]}"
  else
    python -m genci_dist.train "${args[@]}"
  fi
  # this invocation only (a killed one never gets here); for a run resumed across sessions
  # the training time is metrics.json's train_wall_s, which carries interrupted epochs over
  echo "$(( $(date +%s) - t0 ))" > "$run/wall_seconds.txt"
  python -m genci_dist.evaluate --checkpoint "$run/checkpoints/best" --split test \
    --out "$run/eval_test.json" --predictions "$run/predictions_test.parquet"
  # valid predictions too, for the calibration report (maps are fitted on valid, never test)
  python -m genci_dist.evaluate --checkpoint "$run/checkpoints/best" --split valid \
    --out "$run/eval_valid.json" --predictions "$run/predictions_valid.parquet"
}

if [ "${REPORT_ONLY:-0}" = 1 ]; then
  echo "=== REPORT_ONLY: no training; reports from the finished runs in $out"
elif [ "$JOBS" -le 1 ]; then
  for name in "${runs[@]}"; do
    echo "=== $(date +%T) $name → $out/$name"
    run_one "$name"
  done
else
  # JOBS runs at a time, one thread each (unless OMP_NUM_THREADS says otherwise): GenCI gains
  # little from a second thread, so two runs side by side nearly double the throughput.
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  mkdir -p "$out"
  pids=()
  for name in "${runs[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
    echo "=== $(date +%T) $name → $out/$name (log: $out/$name.log)"
    run_one "$name" > "$out/$name.log" 2>&1 &
    pids+=($!)
  done
  failed=0
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { echo "!!! ${runs[$i]} failed: see $out/${runs[$i]}.log" >&2; failed=1; }
  done
  [ "$failed" -eq 0 ] || exit 1
fi

# The table covers every finished run of this set (not only the ones named in MODELS), so
# running one model later does not drop the others from results.md.
metrics=()
for m in "$out"/*/metrics.json; do [ -f "$m" ] && metrics+=("$m"); done
base=""
if [ "$what" = ml100k-ablations ]; then  # Table 4 sets the variants beside full GenCI
  for m in "$RUNS/ml100k/deepfm/metrics.json" "$RUNS/ml100k/genci/metrics.json"; do
    [ -f "$m" ] && metrics+=("$m")
  done
  [ -f "$RUNS/ml100k/deepfm/metrics.json" ] && base="--base deepfm"
fi
[ -f "$out/deepfm/metrics.json" ] && base="--base deepfm"
# shellcheck disable=SC2086
python -m genci_dist.analysis.report compare "${metrics[@]}" $base | tee "$out/results.md"

# Calibration of every run with valid and test predictions: how much of its test LogLoss a
# prior shift or Platt's map fitted on its valid predictions removes (a diagnostic).
cvalid=() ctest=()
for d in "$out"/*/; do
  name="$(basename "$d")"
  if [ -f "$d/predictions_valid.parquet" ] && [ -f "$d/predictions_test.parquet" ]; then
    cvalid+=("$name=$d/predictions_valid.parquet")
    ctest+=("$name=$d/predictions_test.parquet")
  fi
done
if [ "${#ctest[@]}" -gt 0 ]; then
  python -m genci_dist.analysis.report calibration --valid "${cvalid[@]}" --test "${ctest[@]}" \
    --out "$out/calibration"
fi

# Table 5 and the figures, from what has finished: interest volatility over every model with
# test predictions (DeepFM the base), and for a finished GenCI run its training curves and
# Fig. 4 (t-SNE of the intents) in its run folder. The ablation set has its own table only.
if [ "$what" != ml100k-ablations ]; then
  preds=()
  for name in deepfm dcnv2 din genci; do
    p="$out/$name/predictions_test.parquet"
    [ -f "$p" ] && preds+=("$name=$p")
  done
  if [ "${#preds[@]}" -gt 0 ]; then
    vbase=""
    [ -f "$out/deepfm/predictions_test.parquet" ] && vbase="--base deepfm"
    # shellcheck disable=SC2086
    python -m genci_dist.analysis.report volatility --data "$data" --predictions "${preds[@]}" \
      --out "$out/volatility" $vbase
  fi
  if [ -f "$out/genci/metrics.json" ] && [ -e "$out/genci/checkpoints/best" ]; then
    python -m genci_dist.analysis.report figures --run "$out/genci" \
      --checkpoint "$out/genci/checkpoints/best" --data "$data" --tsne-samples 1500
  fi
fi
