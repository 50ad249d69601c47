#!/usr/bin/env bash
# Train the ESCI 4-class LoRA reranker.
# Every variable below can be overridden from the environment; extra arguments are forwarded to train.py.
#   bash scripts/run_train.sh
#   NPROC=4 bash scripts/run_train.sh --max_steps 2000
set -euo pipefail
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"

# data and model
BASE_MODEL="${BASE_MODEL:-Qwen/Qwen3-0.6B}"
TRAIN_FILE="${TRAIN_FILE:-../datasets/esci-data/esci_multiclass_train.parquet}"
OUTPUT_DIR="${OUTPUT_DIR:-outputs/qwen3-0.6b-esci-lora}"
MAX_LEN="${MAX_LEN:-512}"
EVAL_RATIO="${EVAL_RATIO:-0.02}"
SEED="${SEED:-42}"

# optimisation
BATCH_SIZE="${BATCH_SIZE:-16}"
EVAL_BATCH_SIZE="${EVAL_BATCH_SIZE:-32}"
GRAD_ACCUM="${GRAD_ACCUM:-4}"
EPOCHS="${EPOCHS:-1}"
LR="${LR:-1e-4}"
WARMUP_RATIO="${WARMUP_RATIO:-0.03}"
DTYPE="${DTYPE:-auto}"             # auto: bf16 on GPUs and CPUs with native bf16, else fp32; or fp32 / bf16
FLASH_ATTN="${FLASH_ATTN:-1}"      # 0: force sdpa even if flash-attn is installed
GRAD_CKPT="${GRAD_CKPT:-0}"        # 1: gradient checkpointing (less memory, ~30% slower)
MAX_MICRO_BATCHES="${MAX_MICRO_BATCHES:-4}"  # each random step is cut into <= N length-sorted micro-batches

# LoRA
LORA_R="${LORA_R:-16}"
LORA_ALPHA="${LORA_ALPHA:-32}"
LORA_DROPOUT="${LORA_DROPOUT:-0.05}"
LORA_TARGETS="${LORA_TARGETS:-q_proj,v_proj}"

# logging and checkpoints
LOGGING_STEPS="${LOGGING_STEPS:-10}"
SAVE_STEPS="${SAVE_STEPS:-500}"
SAVE_TOTAL_LIMIT="${SAVE_TOTAL_LIMIT:-3}"
REPORT_TO="${REPORT_TO:-none}"     # wandb: set WANDB_PROJECT too
WANDB_RUN_NAME="${WANDB_RUN_NAME:-$(basename "$OUTPUT_DIR")}"

# processes
NPROC="${NPROC:-1}"
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: NPROC must be a positive number of processes, got '$NPROC'" >&2
  exit 2
fi

data_args=(--base_model "$BASE_MODEL" --train_file "$TRAIN_FILE" --output_dir "$OUTPUT_DIR"
           --max_length "$MAX_LEN" --eval_ratio "$EVAL_RATIO" --seed "$SEED")
optim_args=(--per_device_train_batch_size "$BATCH_SIZE" --per_device_eval_batch_size "$EVAL_BATCH_SIZE"
            --gradient_accumulation_steps "$GRAD_ACCUM" --num_train_epochs "$EPOCHS"
            --learning_rate "$LR" --warmup_ratio "$WARMUP_RATIO" --dtype "$DTYPE"
            --max_micro_batches "$MAX_MICRO_BATCHES")
lora_args=(--lora_r "$LORA_R" --lora_alpha "$LORA_ALPHA" --lora_dropout "$LORA_DROPOUT"
           --lora_target_modules "$LORA_TARGETS")
log_args=(--logging_steps "$LOGGING_STEPS" --save_steps "$SAVE_STEPS" --save_total_limit "$SAVE_TOTAL_LIMIT"
          --report_to "$REPORT_TO" --wandb_run_name "$WANDB_RUN_NAME")
switches=()
[ "${BF16:-}" = "1" ] && switches+=(--bf16)   # older spelling of DTYPE=bf16
[ "$FLASH_ATTN" = "0" ] && switches+=(--no_flash_attn)
[ "$GRAD_CKPT" = "1" ] && switches+=(--gradient_checkpointing)

if [ "$NPROC" -gt 1 ]; then
  launcher=("$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC")   # torchrun, from the same Python
else
  launcher=("$PYTHON")
fi

set -x
"${launcher[@]}" "$REPO_DIR/train.py" "${data_args[@]}" "${optim_args[@]}" "${lora_args[@]}" "${log_args[@]}" \
  ${switches[@]+"${switches[@]}"} "$@"
