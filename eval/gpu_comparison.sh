#!/usr/bin/env bash
# The larger versions of the comparisons, sized for one GPU lent for 15 minutes (an H100 here; see README).
#
#   bash eval/gpu_comparison.sh train     # on the GPU: speed benchmark of every preset (fp32, GPU idle), the MNIST
#                                         # pair (eval/compare_mnist.sh: bf16, both at once, then NUM_SAMPLES
#                                         # DDIM-50 samples each, saved by eval/fid.py --samples_only) and, with
#                                         # SEG_STEPS > 0, the paper-sized segmentation pair beside it
#   bash eval/gpu_comparison.sh score     # anywhere with the Inception weights, a CPU too: FID/KID/precision/recall
#                                         # of the saved samples (train and fair phases) against MNIST train, and
#                                         # their digit scores (eval/digit_score.py: recognisable share, digit FD)
#   bash eval/gpu_comparison.sh compiled  # on the GPU: bf16 + channels_last + torch.compile benchmark of the 5M pair
#   bash eval/gpu_comparison.sh fair      # on the GPU: the fair generation protocol (eval/fair_compare.py) for the
#                                         # 5M pair on MNIST 32x32, 3 learning rates each, all 6 runs at once on the
#                                         # GPU (bf16), FAIR_STEPS (default 1500) x BATCH; then NUM_SAMPLES DDIM-50
#                                         # samples of each model's selected run (scored by the `score` phase)
#   bash eval/gpu_comparison.sh fair-dit  # on the GPU: the same protocol for D-EMOv2-S/2 vs diffusers' DiT-S/2
#                                         # (demo-s-2, dit-s-2), class-conditional on MNIST 32x32 (a 16x16 token
#                                         # map), samples with balanced labels
#   bash eval/gpu_comparison.sh seg-paper # on the GPU: the paper's HRF recipe (AdamW 1.2e-4, wd 0.05, clip 0.1,
#                                         # warm-up, 256px crops) on synthetic fundi, U-EMOv2 vs UNet-S5-D16 at once;
#                                         # SEG_PAPER_STEPS (default 300) is sized from an earlier H100 lease's step
#                                         # rate (U-EMOv2 ~2.6 steps/s at 128px) to end within one 10-minute call
#
# Sampling and scoring are split so that the GPU needs neither the Inception weights (95 MB, more than a lease
# carries beside the data) nor the time to score. Knobs: OUT, DATA, STEPS, BATCH, NUM_SAMPLES, SEG_STEPS, FAIR_STEPS,
# INCEPTION (weights file for FID), DEVICE, SCORE_DEVICE, COMPILE_TIMEOUT, SMOKE=1 (tiny sizes, for checking on a CPU).
# The fair phases' FAIR_STEPS default is a guess (no lease has run them yet): six runs share the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-outputs/gpu}
DATA=${DATA:-../shared/data/mnist}
STEPS=${STEPS:-2500}
BATCH=${BATCH:-128}
NUM_SAMPLES=${NUM_SAMPLES:-5000}
SEG_STEPS=${SEG_STEPS:-0}
DEVICE=${DEVICE:-cuda}
FAIR_STEPS=${FAIR_STEPS:-1500}
# One timing run of 100 steps per model (eval/fair_compare.py's equal-time axis) to fit the call.
fair=(--learning_rates 3e-4 1e-3 3e-3 --heldout_num_images 512 --timing_steps 100 --timing_repeats 1)
fair_train=()
# Batch 256: where the GPU has arithmetic to do rather than kernel launches to wait on.
bench=(--device "$DEVICE" --batch_sizes 1 16 256)
seg=(--crop_size 128 --synthetic_size 256 256 --num_synthetic_train 40 --train_batch_size 8 --cost_size 256)
seg_paper=(--crop_size 256 --synthetic_size 512 512 --num_synthetic_train 40 --train_batch_size 8 --cost_size 256)
fid_batch=500
digit=()
inference_steps=50
if [ "${SMOKE:-0}" = 1 ]; then
  bench=(--device "$DEVICE" --quick --models emov2-1m unet2d-5m)
  seg=(--crop_size 32 --synthetic_size 64 64 --num_synthetic_train 2 --num_synthetic_validation 1
       --num_synthetic_test 1 --train_batch_size 2 --cost_size 64 --cost_models --latency_repeats 1)
  seg_paper=("${seg[@]}")
  seg+=(--learning_rates 1e-2)  # one run per model (the sweeps are seg_benchmark's and fair_compare's own tests)
  fair=(--learning_rates 1e-3 --heldout_num_images 8 --timing_steps 1 --timing_warmup_steps 1 --timing_repeats 1)
  fair_train=(--eval_batch_size 2 --ddpm_num_inference_steps 2)  # the runs' final preview grids
  fid_batch=4
  digit=(--classifier_images 200 --classifier_epochs 1)
  inference_steps=2
fi
mkdir -p "$OUT"
mnist=(env OUT="$OUT/mnist" DATA="$DATA" STEPS="$STEPS" BATCH="$BATCH" NUM_SAMPLES="$NUM_SAMPLES"
       MIXED_PRECISION=bf16 WORKERS=4 PARALLEL=1)

# The fair generation protocol (eval/fair_compare.py) for one pair: 3 lrs x 2 models at once on the device, then
# samples of each model's selected run, saved for the `score` phase.
fair_protocol() {
  local name=$1 model_a=$2 model_b=$3
  shift 3
  python eval/fair_compare.py --models "$model_a" "$model_b" "${fair[@]}" "$@" --dataset_name "$DATA" \
    --resolution 32 --train_batch_size "$BATCH" --max_train_steps "$FAIR_STEPS" \
    --heldout_steps "$(( FAIR_STEPS / 6 > 0 ? FAIR_STEPS / 6 : 1 ))" --num_samples 0 --jobs 6 --threads 2 \
    --device "$DEVICE" --output_dir "$OUT/$name" \
    --train_args --mixed_precision "$([ "$DEVICE" = cpu ] && echo no || echo bf16)" --dataloader_num_workers 1 \
    "${fair_train[@]}"
  local selected
  mapfile -t selected < <(python -c "import json, sys; [print(m['run_dir']) for m in json.load(open(sys.argv[1]))['models'].values()]" "$OUT/$name/report.json")
  python eval/fid.py --model_dirs "${selected[@]}" --samples_only --num_samples "$NUM_SAMPLES" "$@" \
    --num_inference_steps "$inference_steps" --scheduler ddim --seed 0 --batch_size "$fid_batch" --device "$DEVICE" \
    --output_dir "$OUT/$name/fid"
}

case "${1:-}" in
  train)
    python eval/benchmark.py "${bench[@]}" --output_dir "$OUT/benchmark-fp32"
    seg_pid=
    if [ "$SEG_STEPS" -gt 0 ]; then
      python eval/seg_benchmark.py --models unet-emov2-paper unet-s5-d16 --jobs 2 --threads 4 \
        --max_train_steps "$SEG_STEPS" "${seg[@]}" --output_dir "$OUT/seg" > "$OUT/seg.log" 2>&1 &
      seg_pid=$!
    fi
    "${mnist[@]}" STAGES="train fid" FID_ARGS="--samples_only --batch_size $fid_batch --device $DEVICE" \
      bash eval/compare_mnist.sh
    [ -z "$seg_pid" ] || wait "$seg_pid"
    ;;
  score)
    # eval/fid.py scores on CUDA when available, else on the CPU; SCORE_DEVICE overrides.
    for fid_dir in "$OUT"/mnist/fid "$OUT"/fair/fid "$OUT"/fair-dit/fid; do
      [ -d "$fid_dir/samples" ] || continue
      python eval/fid.py --samples "$fid_dir"/samples/*.pt --reference "$DATA" --split train \
        --batch_size "$fid_batch" ${SCORE_DEVICE:+--device "$SCORE_DEVICE"} \
        ${INCEPTION:+--inception-weights "$INCEPTION"} --output_dir "$fid_dir"
      python eval/digit_score.py --samples "$fid_dir"/samples/*.pt --reference "$DATA" "${digit[@]}" \
        ${SCORE_DEVICE:+--device "$SCORE_DEVICE"} --output_dir "$fid_dir/digits"
    done
    ;;
  fair)
    fair_protocol fair emov2-5m unet2d-5m
    ;;
  fair-dit)
    fair_protocol fair-dit demo-s-2 dit-s-2 --class_conditional
    ;;
  compiled)
    compiled=(--dtype bf16 --channels_last --compile)
    [ "$DEVICE" = cpu ] && compiled=(--dtype bf16 --channels_last)
    # Compilation per input shape can take minutes: bounded so that the phase still ends in time.
    timeout "${COMPILE_TIMEOUT:-240}" python eval/benchmark.py "${bench[@]}" --models emov2-5m unet2d-5m \
      "${compiled[@]}" --output_dir "$OUT/benchmark-bf16-compiled" || echo "compiled benchmark did not finish"
    ;;
  seg-paper)
    python eval/seg_benchmark.py --models unet-emov2-paper unet-s5-d16 --jobs 2 --threads 4 \
      --max_train_steps "${SEG_PAPER_STEPS:-300}" --learning_rate 1.2e-4 --max_grad_norm 0.1 --lr_warmup_steps 50 \
      "${seg_paper[@]}" --output_dir "$OUT/seg-paper"
    ;;
  *)
    echo "usage: bash eval/gpu_comparison.sh train|score|compiled|seg-paper|fair|fair-dit" >&2
    exit 2
    ;;
esac
