#!/usr/bin/env bash
# Evaluate a trained ESCI reranker (or, with LORA_MODEL="", the zero-shot base model).
# Every variable below can be overridden from the environment; extra arguments are forwarded to eval.py.
#   bash scripts/run_eval.sh
#   LORA_MODEL= bash scripts/run_eval.sh --max_samples 5000     # zero-shot baseline
#   NPROC=4 bash scripts/run_eval.sh                            # 4 GPUs, each scores a quarter of the pairs
set -euo pipefail
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"

# model
BASE_MODEL="${BASE_MODEL:-Qwen/Qwen3-0.6B}"
OUTPUT_DIR="${OUTPUT_DIR:-outputs/qwen3-0.6b-esci-lora}"
LORA_MODEL="${LORA_MODEL-$OUTPUT_DIR}"   # set to an empty string for the zero-shot baseline
DTYPE="${DTYPE:-auto}"             # auto: bf16 on CUDA and on CPUs with native bf16, else fp32
FLASH_ATTN="${FLASH_ATTN:-1}"
TEMPERATURE="${TEMPERATURE:-1}"    # 0: ignore the temperature train.py --calibrate stored (raw logits)

# data
EVAL_FILE="${EVAL_FILE:-../datasets/esci-data/esci_multiclass_test.parquet}"
MAX_LEN="${MAX_LEN:-512}"
BATCH_SIZE="${BATCH_SIZE:-64}"
MAX_BATCH_TOKENS="${MAX_BATCH_TOKENS:-16384}"

# outputs
RESULTS_DIR="${RESULTS_DIR:-${LORA_MODEL:-outputs/zero-shot}}"
SAVE_SCORES="${SAVE_SCORES:-$RESULTS_DIR/test_scores.parquet}"
METRICS_PATH="${METRICS_PATH:-$RESULTS_DIR/eval_metrics.json}"
PLOTS="${PLOTS:-1}"                # 0: no PNG plots next to the metrics JSON

# processes
NPROC="${NPROC:-1}"                # >1: torchrun; each process scores its share, rank 0 writes
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: NPROC must be a positive number of processes, got '$NPROC'" >&2
  exit 2
fi

model_args=(--base_model "$BASE_MODEL" --dtype "$DTYPE")
[ -n "$LORA_MODEL" ] && model_args+=(--lora_model "$LORA_MODEL")
[ "$FLASH_ATTN" = "0" ] && model_args+=(--no_flash_attn)
[ "$TEMPERATURE" = "0" ] && model_args+=(--no_temperature)
data_args=(--eval_file "$EVAL_FILE" --max_length "$MAX_LEN" --batch_size "$BATCH_SIZE" --max_batch_tokens "$MAX_BATCH_TOKENS")
out_args=(--save_scores_path "$SAVE_SCORES" --metrics_path "$METRICS_PATH")
[ "$PLOTS" = "0" ] && out_args+=(--no_plots)

if [ "$NPROC" -gt 1 ]; then
  launcher=("$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC")   # torchrun, from the same Python
else
  launcher=("$PYTHON")
fi

set -x
"${launcher[@]}" "$REPO_DIR/eval.py" "${model_args[@]}" "${data_args[@]}" "${out_args[@]}" "$@"
