#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run of a few minutes (README "Devices, precision, distributed
# training"); each step has its own time limit, so one slow step cannot eat the others' time:
#   1. the CUDA tests: FlexAttention's compiled kernel, masks built on the input's device, int8 (torch._int_mm)
#      and bf16 inference, SDPA without cuDNN, which skip on a CPU;
#   2. scripts/gpu_probe.py: the int8 matmul shapes cuBLASLt takes, beam search with and without cuDNN attention;
#   3. a short Multi30k fit on the GPU in 16-mixed (loss scaling), then `test` of it in fp32, bf16 and int8;
#   4. the MFU benchmark (GPT-2 small, bf16 autocast, torch.compile) against transformers' GPT2LMHeadModel;
#   5. the same fit in bf16-mixed.
#
#   bash scripts/gpu_checks.sh [DATA] [OUT] [RUNS]
# DATA: the shipped data (default ../shared/data); OUT: the logs of each command and mfu.json (default
# gpu_checks); RUNS: the runs' folders (default /tmp/gpu_checks_runs). The summary goes to the console.
set -uo pipefail
DATA=${1:-../shared/data}
OUT=${2:-gpu_checks}
RUNS=${3:-/tmp/gpu_checks_runs}
PY=${PYTHON:-python3}
STEPS=${STEPS:-300}
mkdir -p "$OUT" "$RUNS"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
[ -d "$DATA/multi30k" ] || { echo "$DATA/multi30k not found: pass the shipped data folder as the first argument"; exit 2; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c "import torch, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'lightning', lightning.__version__)"

echo "== CUDA tests"
timeout 100 $PY -m pytest -q -p no:cacheprovider -n 0 tests/blocks/attention_variants/test_flex.py \
    tests/models/test_attention_contract.py tests/test_inference_precision.py tests/blocks/test_sdpa.py 2>&1 | tail -15

echo "== probe"
timeout 90 $PY scripts/gpu_probe.py 2>&1 | grep -v Warning

csv_logger() { echo "[{\"class_path\": \"lightning.pytorch.loggers.CSVLogger\", \"init_args\": {\"save_dir\": \"$1\", \"name\": \"logs\"}}]"; }
data_args=(--data.train_path "$DATA/multi30k/train" --data.val_path "$DATA/multi30k/val"
           --data.test_path "$DATA/multi30k/test2016")

fit() {           # fit PRECISION: $STEPS steps of the Multi30k recipe on the GPU
    local run=$RUNS/fit_$1
    echo "== fit, $1, $STEPS steps"
    timeout 100 $PY -m lightning_tfm.cli fit --config configs/translation/multi30k_small.yaml "${data_args[@]}" \
        --trainer.accelerator gpu --trainer.devices 1 --trainer.precision "$1" --trainer.max_steps "$STEPS" \
        --trainer.default_root_dir "$run" --trainer.logger "$(csv_logger "$run")" --trainer.enable_progress_bar false \
        > "$OUT/fit_$1.log" 2>&1
    echo "exit $?"; grep -iE "error|precision|nan" "$OUT/fit_$1.log" | tail -5
    tail -3 "$run/logs/version_0/metrics.csv" 2>/dev/null
}

fit 16-mixed
for inference in fp32 bf16 int8; do
    echo "== test, weights from 16-mixed, inference_precision $inference"
    start=$EPOCHREALTIME
    timeout 45 $PY -m lightning_tfm.cli test --config configs/translation/multi30k_small.yaml "${data_args[@]}" \
        --trainer.accelerator gpu --trainer.devices 1 --trainer.default_root_dir "$RUNS/fit_16-mixed" \
        --trainer.logger "$(csv_logger "$RUNS/test_$inference")" --ckpt_path "$RUNS/fit_16-mixed/checkpoints/last.ckpt" \
        --inference_precision "$inference" > "$OUT/test_$inference.log" 2>&1
    echo "exit $?, $(awk "BEGIN {print $EPOCHREALTIME - $start}") s with start-up"; grep -E "test_bleu|evaluating in|Testing DataLoader|it/s" "$OUT/test_$inference.log" | tail -4
done

echo "== MFU"
timeout 150 $PY scripts/bench.py --only mfu --json "$OUT/mfu.json" 2>&1 | tail -8

fit bf16-mixed
