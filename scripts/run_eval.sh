#!/usr/bin/env bash
# Evaluate a trained ESCI reranker (or, with LORA_MODEL="", the zero-shot base model).
# Every variable below can be overridden from the environment; extra arguments are forwarded to eval.py.
#   bash scripts/run_eval.sh
#   LORA_MODEL= bash scripts/run_eval.sh --max_samples 5000     # zero-shot baseline
set -euo pipefail
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"

# model
BASE_MODEL="${BASE_MODEL:-Qwen/Qwen3-0.6B}"
OUTPUT_DIR="${OUTPUT_DIR:-outputs/qwen3-0.6b-esci-lora}"
LORA_MODEL="${LORA_MODEL-$OUTPUT_DIR}"   # set to an empty string for the zero-shot baseline
DTYPE="${DTYPE:-auto}"             # auto: bf16 on CUDA and on CPUs with native bf16, else fp32
FLASH_ATTN="${FLASH_ATTN:-1}"

# data
EVAL_FILE="${EVAL_FILE:-../datasets/esci-data/esci_multiclass_test.parquet}"
MAX_LEN="${MAX_LEN:-512}"
BATCH_SIZE="${BATCH_SIZE:-64}"
MAX_BATCH_TOKENS="${MAX_BATCH_TOKENS:-16384}"

# outputs
RESULTS_DIR="${RESULTS_DIR:-${LORA_MODEL:-outputs/zero-shot}}"
SAVE_SCORES="${SAVE_SCORES:-$RESULTS_DIR/test_scores.parquet}"
METRICS_PATH="${METRICS_PATH:-$RESULTS_DIR/eval_metrics.json}"

model_args=(--base_model "$BASE_MODEL" --dtype "$DTYPE")
[ -n "$LORA_MODEL" ] && model_args+=(--lora_model "$LORA_MODEL")
[ "$FLASH_ATTN" = "0" ] && model_args+=(--no_flash_attn)
data_args=(--eval_file "$EVAL_FILE" --max_length "$MAX_LEN" --batch_size "$BATCH_SIZE" --max_batch_tokens "$MAX_BATCH_TOKENS")
out_args=(--save_scores_path "$SAVE_SCORES" --metrics_path "$METRICS_PATH")

set -x
"$PYTHON" "$REPO_DIR/eval.py" "${model_args[@]}" "${data_args[@]}" "${out_args[@]}" "$@"
