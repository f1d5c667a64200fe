#!/usr/bin/env bash
# The first real comparison: EMOv2-5M UNet vs the parameter-matched diffusers UNet2DModel on MNIST 32x32.
#
# Both models get the same data, steps, batch, schedule, optimiser and seed; then eval/fid.py samples
# both with EMA weights and DDIM and scores them against the MNIST train split (same seeds, same
# reference statistics), and eval/benchmark.py measures their speed side by side.
#
# Resumable: re-running the script continues training from the latest checkpoint of each model and
# skips finished stages. Run it in the background, e.g.
#   nohup bash eval/compare_mnist.sh > compare_mnist.log 2>&1 &
# Knobs (environment variables): STEPS, BATCH, NUM_SAMPLES, INFERENCE_STEPS, SEED, OUT, DATA, MODELS,
#   MIXED_PRECISION (no|bf16|fp16), WORKERS (data-loading processes), PARALLEL=1 (train the models at
#   the same time, e.g. on one GPU), STAGES (any of "train fid speed"), FID_ARGS, BENCH_ARGS (extra flags).
set -euo pipefail
cd "$(dirname "$0")/.."

STEPS=${STEPS:-2000}
BATCH=${BATCH:-32}
NUM_SAMPLES=${NUM_SAMPLES:-1000}
INFERENCE_STEPS=${INFERENCE_STEPS:-50}
SEED=${SEED:-0}
OUT=${OUT:-outputs/compare_mnist}
DATA=${DATA:-../shared/data/mnist}
MODELS=${MODELS:-"emov2-5m unet2d-5m"}
MIXED_PRECISION=${MIXED_PRECISION:-no}
WORKERS=${WORKERS:-0}
PARALLEL=${PARALLEL:-0}
STAGES=${STAGES:-"train fid speed"}
FID_ARGS=${FID_ARGS:-}
BENCH_ARGS=${BENCH_ARGS:---quick}

train() {  # train MODEL into $OUT/MODEL unless it is already done; resumes from its latest checkpoint
  local model=$1 run="$OUT/$1"
  if [ -f "$run/model_index.json" ] && [ -f "$run/.done" ]; then
    echo "== $model: already trained ($run)"
    return
  fi
  echo "== training $model for $STEPS steps (batch $BATCH, seed $SEED, mixed precision $MIXED_PRECISION)"
  local start
  start=$(date +%s)
  accelerate launch --num_processes 1 --mixed_precision "$MIXED_PRECISION" train/train_ddpm.py \
    --model "$model" --dataset_name "$DATA" --resolution 32 --train_batch_size "$BATCH" \
    --max_train_steps "$STEPS" --learning_rate 2e-4 --lr_warmup_steps 200 --use_ema \
    --ddpm_num_steps 1000 --ddpm_num_inference_steps "$INFERENCE_STEPS" --seed "$SEED" \
    --mixed_precision "$MIXED_PRECISION" --dataloader_num_workers "$WORKERS" \
    --checkpointing_steps 250 --checkpoints_total_limit 2 --resume_from_checkpoint latest \
    --save_images_epochs 1000 --output_dir "$run"
  # Wall time of this invocation, added to any earlier (interrupted) ones.
  local before=0
  [ -f "$run/.train_seconds" ] && before=$(cat "$run/.train_seconds")
  echo "$(( before + $(date +%s) - start ))" > "$run/.train_seconds"
  touch "$run/.done"
}

mkdir -p "$OUT"
if [[ " $STAGES " == *" train "* ]]; then
  if [ "$PARALLEL" = 1 ]; then
    pids=()
    for model in $MODELS; do
      train "$model" > "$OUT/train_$model.log" 2>&1 &
      pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
  else
    for model in $MODELS; do train "$model"; done
  fi
fi

dirs=()
for model in $MODELS; do dirs+=("$OUT/$model"); done
if [[ " $STAGES " == *" fid "* ]]; then
  echo "== FID: $NUM_SAMPLES samples per model, DDIM-$INFERENCE_STEPS, vs MNIST train"
  # shellcheck disable=SC2086
  python eval/fid.py --model_dirs "${dirs[@]}" --reference "$DATA" --split train \
    --num_samples "$NUM_SAMPLES" --num_inference_steps "$INFERENCE_STEPS" --scheduler ddim \
    --seed "$SEED" --output_dir "$OUT/fid" $FID_ARGS
fi

if [[ " $STAGES " == *" speed "* ]]; then
  echo "== speed"
  # shellcheck disable=SC2086
  python eval/benchmark.py --models $MODELS $BENCH_ARGS --output_dir "$OUT/benchmark"
fi
echo "== done: $OUT/fid/report.md, $OUT/benchmark/benchmark.md"
