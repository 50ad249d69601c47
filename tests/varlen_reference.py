"""A pure-PyTorch stand-in for flash-attention's varlen kernel, so the packed path's layout runs on CPU.

Registered as the attention implementation ``"varlen_reference"``. With varlen kwargs
(``cu_seq_lens_q``/``cu_seq_lens_k``) it attends each sequence's queries to its own keys with a
causal mask aligned bottom-right, as flash-attention >= 2.1 does when a sequence has more keys
than queries; without them it is plain causal sdpa. It has no mask function, so transformers
builds no mask for it, as for flash-attention without padding.
"""

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

NAME = "varlen_reference"


def varlen_reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """``query [1, H, T, D]``, ``key/value [1, H_kv, S, D]`` -> ``([1, T, H, D], None)``."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None:  # one unpadded sequence per row (the shared prefix run alone)
        assert attention_mask is None and query.shape[2] == key.shape[2], "unpadded full sequences only"
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    outs = []
    for i in range(len(cu_q) - 1):
        q = query[:, :, int(cu_q[i]):int(cu_q[i + 1])]
        k, v = key[:, :, int(cu_k[i]):int(cu_k[i + 1])], value[:, :, int(cu_k[i]):int(cu_k[i + 1])]
        n_q, n_k = q.shape[2], k.shape[2]
        causal = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(diagonal=n_k - n_q)
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=scaling))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, varlen_reference_attention)
