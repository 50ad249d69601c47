"""The plain reference every training test compares train.py with: random batches of full padded prompts,
AdamW, linear decay, the 4-row label head, no layout tricks. Same data and steps as the run it judges."""

import numpy as np
import torch

from esci_dataset import LABEL_TO_ID, PromptEncoder, label_token_ids
from tests.helpers import score_token_ids
from tiny_reranker.batching import collate_left_padded
from tiny_reranker.forward import label_logits
from tiny_reranker.modeling import apply_lora, attach_label_head, load_base_model, load_tokenizer


def reference_loop(model_dir, train_df, *, steps: int, batch: int, lr: float, targets: str, max_len: int, seed: int):
    """LoRA (r 16, alpha 32, no dropout) trained for ``steps`` random batches of ``batch`` rows (one permutation,
    wrapping into a new one when it runs out). Returns ``(model in eval mode, tokenizer)``."""
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(model_dir)
    model = apply_lora(attach_label_head(load_base_model(model_dir), label_token_ids(tokenizer)),
                       r=16, alpha=32, dropout=0.0, target_modules=targets)
    ids = PromptEncoder(tokenizer, max_len).encode_batch(train_df["query"].tolist(), train_df["item_text"].tolist())
    labels = train_df["esci_label"].map(LABEL_TO_ID).to_numpy()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(ids)) for _ in range(-(-steps * batch // len(ids)))])
    model.train()
    for step in range(steps):
        idx = order[step * batch:(step + 1) * batch]
        rows = collate_left_padded([{"input_ids": ids[i], "labels": int(labels[i])} for i in idx], tokenizer.pad_token_id)
        torch.nn.functional.cross_entropy(label_logits(model, rows), rows["labels"]).backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    return model.eval(), tokenizer


def held_out_accuracy(model, tokenizer, test_df, max_len: int) -> tuple[float, list[float]]:
    """``(accuracy, [recall of E, S, C, I])`` of the argmax over the 4 label logits on ``test_df``."""
    ids = PromptEncoder(tokenizer, max_len).encode_batch(test_df["query"].tolist(), test_df["item_text"].tolist())
    pred = score_token_ids(model, ids, tokenizer.pad_token_id).argmax(axis=1)
    true = test_df["esci_label"].map(LABEL_TO_ID).to_numpy()
    return float((pred == true).mean()), [float((pred[true == c] == c).mean()) for c in range(4)]
