#!/usr/bin/env bash
# The larger versions of the comparisons, sized for one GPU (an H100 when one is lent; see README).
#
#   bash eval/gpu_comparison.sh train   # GPU speed benchmark of every preset (fp32, GPU idle), then the
#                                       # MNIST pair (eval/compare_mnist.sh, bf16, both at once) and the
#                                       # paper-sized segmentation pair (eval/seg_benchmark.py) together
#   bash eval/gpu_comparison.sh score   # finishes any interrupted training, FID of the MNIST pair
#                                       # (NUM_SAMPLES, DDIM-50), and a bf16 + channels_last + compiled
#                                       # benchmark of the two 5M models
#
# The two phases exist so that each fits in one call of a time-limited GPU lease; run them back to back.
# Knobs: OUT, DATA, STEPS, BATCH, NUM_SAMPLES, SEG_STEPS, INCEPTION (weights file for FID), DEVICE, COMPILE_TIMEOUT,
# SMOKE=1 (tiny sizes, for checking the script on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-outputs/gpu}
DATA=${DATA:-../shared/data/mnist}
STEPS=${STEPS:-4000}
BATCH=${BATCH:-128}
NUM_SAMPLES=${NUM_SAMPLES:-5000}
SEG_STEPS=${SEG_STEPS:-2000}
DEVICE=${DEVICE:-cuda}
bench=(--device "$DEVICE")
seg=(--crop_size 128 --synthetic_size 256 256 --num_synthetic_train 40 --train_batch_size 8 --cost_size 256)
fid_batch=500
if [ "${SMOKE:-0}" = 1 ]; then
  bench+=(--quick --models emov2-1m unet2d-5m)
  seg=(--crop_size 32 --synthetic_size 64 64 --num_synthetic_train 2 --num_synthetic_validation 1
       --train_batch_size 2 --cost_size 64 --cost_models --latency_repeats 1)
  fid_batch=4
fi
mkdir -p "$OUT"
mnist=(env OUT="$OUT/mnist" DATA="$DATA" STEPS="$STEPS" BATCH="$BATCH" NUM_SAMPLES="$NUM_SAMPLES"
       MIXED_PRECISION=bf16 WORKERS=4 PARALLEL=1)

case "${1:-}" in
  train)
    python eval/benchmark.py "${bench[@]}" --output_dir "$OUT/benchmark-fp32"
    python eval/seg_benchmark.py --models unet-emov2-paper unet-s5-d16 --jobs 2 --threads 4 \
      --max_train_steps "$SEG_STEPS" "${seg[@]}" --output_dir "$OUT/seg" > "$OUT/seg.log" 2>&1 &
    seg_pid=$!
    "${mnist[@]}" STAGES=train bash eval/compare_mnist.sh
    wait "$seg_pid"
    ;;
  score)
    "${mnist[@]}" STAGES="train fid" \
      FID_ARGS="--batch_size $fid_batch --device $DEVICE ${INCEPTION:+--inception-weights $INCEPTION}" \
      bash eval/compare_mnist.sh
    compiled=(--dtype bf16 --channels_last --compile)
    [ "$DEVICE" = cpu ] && compiled=(--dtype bf16 --channels_last)
    # Compilation per input shape can take minutes: bounded so that the phase still ends in time.
    timeout "${COMPILE_TIMEOUT:-240}" python eval/benchmark.py "${bench[@]}" --models emov2-5m unet2d-5m \
      "${compiled[@]}" --output_dir "$OUT/benchmark-bf16-compiled" || echo "compiled benchmark did not finish"
    ;;
  *)
    echo "usage: bash eval/gpu_comparison.sh train|score" >&2
    exit 2
    ;;
esac
