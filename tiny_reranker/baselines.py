"""Off-the-shelf baselines for eval.py's report: is fine-tuning worth it?

``qwen3-reranker``: a base model scored with Qwen3-Reranker's published yes/no prompt, ranking by
``P(yes) = softmax([logit(no), logit(yes)])[1]`` at the last prompt position, as the model card's
transformers example does. On Qwen/Qwen3-Reranker-0.6B this is what its users would deploy; on the
base LM our recipe fine-tunes (Qwen/Qwen3-0.6B) it is that model's zero-shot relevance judgement. The
pairs are truncated like ours (the item text first), and share our batching and prefix reuse.
"""

from __future__ import annotations

import numpy as np
import torch

from esci_dataset import (
    QWEN3_RERANKER_ANSWERS,
    QWEN3_RERANKER_INSTRUCT,
    QWEN3_RERANKER_SYSTEM,
    ESCIDataError,
    build_template,
    check_instruction_is_text,
)
from tiny_reranker.metrics import mean_ndcg, random_order_ndcg, roc_auc
from tiny_reranker.modeling import attach_label_head, default_device, load_base_model, load_tokenizer

BASELINES = ("qwen3-reranker",)


def yes_no_token_ids(tokenizer) -> list[int]:
    """The ids of the vocabulary tokens ``no`` and ``yes``, in that order (each must be one known token)."""
    ids = tokenizer.convert_tokens_to_ids(list(QWEN3_RERANKER_ANSWERS))
    unknown = [t for t, i in zip(QWEN3_RERANKER_ANSWERS, ids) if i is None or i == tokenizer.unk_token_id]
    if unknown:
        raise ESCIDataError(f"the tokenizer has no single token for {unknown}: the qwen3-reranker baseline needs "
                            "a Qwen3 tokenizer")
    return list(ids)


def qwen3_reranker_p_yes(model_path: str, queries: list[str], items: list[str], dtype: torch.dtype,
                         device: torch.device | str | None = None, max_length: int = 512, batch_size: int = 32,
                         max_batch_tokens: int | None = None, no_flash_attn: bool = False,
                         instruction: str = QWEN3_RERANKER_INSTRUCT) -> np.ndarray:
    """``[N]`` float64 P(yes) for aligned pairs, in input order, under Qwen3-Reranker's prompt."""
    from tiny_reranker.reranker import Reranker  # the one inference path, with a 2-row (no, yes) head

    tokenizer = load_tokenizer(model_path)
    check_instruction_is_text(instruction, tokenizer)
    model = attach_label_head(load_base_model(model_path, dtype, no_flash_attn), yes_no_token_ids(tokenizer))
    model.to(device or default_device()).eval()
    reranker = Reranker(model, tokenizer, max_length, batch_size, max_batch_tokens,
                        template=build_template(instruction, QWEN3_RERANKER_SYSTEM))
    logits = reranker.predict_logits(queries, items).astype(np.float64)
    return 1.0 / (1.0 + np.exp(logits[:, 0] - logits[:, 1]))  # softmax over (no, yes), the yes column


def ranking_metrics(groups: np.ndarray | None, y_true: np.ndarray, scores: np.ndarray) -> dict:
    """What a one-number ranker can be compared on: nDCG and nDCG@10 (beside random order) and the two AUCs."""
    out = {"roc_auc_E_vs_rest": roc_auc(y_true == 0, scores), "roc_auc_ES_vs_CI": roc_auc(y_true <= 1, scores)}
    if groups is not None:
        out.update(ndcg=mean_ndcg(groups, y_true, scores)[0], ndcg_random=random_order_ndcg(groups, y_true),
                   **{"ndcg@10": mean_ndcg(groups, y_true, scores, k=10)[0],
                      "ndcg@10_random": random_order_ndcg(groups, y_true, k=10)})
    return out
