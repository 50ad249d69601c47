"""Packed-row attention without the flash-attn package: PyTorch's own varlen kernel, or sdpa per prompt.

A packed training row (``tiny_reranker.batching.collate_packed``) holds several prompts back to back, with no
padding; each prompt may attend only to itself (and, with prefix reuse, to the shared prefix). The
row carries that layout as flash-attention varlen kwargs (``cu_seq_lens_q/k``, ``max_length_q/k``).
transformers hands them to the flash-attn package under ``flash_attention_2``. This module registers
one more attention implementation, :data:`VARLEN_ATTENTION`, that reads the same kwargs:

* on CUDA in bf16/fp16, with a torch that has it: ``torch.nn.attention.varlen.varlen_attn``, the
  flash kernel PyTorch ships (no flash-attn build needed);
* elsewhere: one ``scaled_dot_product_attention`` call per prompt.

Either way a prompt's causal mask is aligned bottom-right (its last query sees every key), as
flash-attention's is when a prompt has more keys (the prefix) than queries. Calls without varlen
kwargs (left-padded batches, the prefix run alone) go to transformers' sdpa with sdpa's masks, so a
model switched to this implementation scores everything else exactly as under ``sdpa``.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from tiny_reranker import compat

VARLEN_ATTENTION = "tiny_reranker_varlen"
PACKED_ATTENTION = ("flash_attention_2", VARLEN_ATTENTION)  # implementations that read packed rows' varlen kwargs


@functools.lru_cache(maxsize=None)
def register() -> str:
    """Register :data:`VARLEN_ATTENTION` (and sdpa's mask builder for it) with transformers; returns its name."""
    compat.register_attention(VARLEN_ATTENTION, varlen_attention)
    return VARLEN_ATTENTION


@functools.lru_cache(maxsize=None)
def torch_varlen_kernel():
    """PyTorch's varlen flash kernel (``torch.nn.attention.varlen.varlen_attn``), or None if this torch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def cuda_kernel_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`varlen_attention` runs PyTorch's flash kernel (not a per-prompt loop) for this device and dtype."""
    return (device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and torch_varlen_kernel() is not None
            and torch.cuda.get_device_capability(device)[0] >= 8)


def choose_packed_attention(model) -> bool:
    """Whether training should pack rows on ``model`` (a causal LM or a peft wrapper), switching it to
    :data:`VARLEN_ATTENTION` where that runs PyTorch's kernel.

    Under ``flash_attention_2``, yes. Under ``sdpa``, only where PyTorch's varlen kernel runs (CUDA, bf16/fp16,
    Ampere or newer): on CPU a packed step measured as fast as length-sorted micro-batches, not faster.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    attn = compat.attn_implementation(base)
    if attn in PACKED_ATTENTION:
        return True
    if attn == "sdpa" and torch.cuda.is_available() and cuda_kernel_runs(torch.device("cuda"), base.dtype):
        base.set_attn_implementation(register())
        return True
    return False


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs):
    """transformers attention function. ``query [1, H, T, D]``, ``key/value [1, H_kv, S, D]`` -> ``([1, T, H, D], None)``.

    ``cu_seq_lens_q [N+1]`` / ``cu_seq_lens_k [N+1]`` (int32) give each prompt's queries and keys in the row.
    """
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None or cu_k is None:
        return compat.sdpa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"packed rows have batch size 1, got {query.shape[0]}")
    if dropout and module.training:
        raise ValueError("varlen attention runs without attention dropout")
    if cuda_kernel_runs(query.device, query.dtype):
        out = _cuda_varlen(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu_q, cu_k,
                           int(kwargs["max_length_q"]), int(kwargs["max_length_k"]), scaling)
        return out.unsqueeze(0), None
    return per_prompt_sdpa(query, key, value, cu_q, cu_k, scaling).transpose(1, 2).contiguous(), None


def per_prompt_sdpa(query, key, value, cu_q, cu_k, scaling: float | None = None) -> torch.Tensor:
    """One sdpa call per prompt, causal mask aligned bottom-right: ``[1, H, T, D]`` in, ``[1, H, T, D]`` out."""
    groups = query.shape[1] // key.shape[1]
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    outs = []
    for (q0, q1), (k0, k1) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])):
        q = query[:, :, q0:q1]
        k = key[:, :, k0:k1].repeat_interleave(groups, dim=1)
        v = value[:, :, k0:k1].repeat_interleave(groups, dim=1)
        n_q, n_k = q1 - q0, k1 - k0
        if n_q == n_k:
            outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling))
        else:
            mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(diagonal=n_k - n_q)
            outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling))
    return torch.cat(outs, dim=2)


@functools.lru_cache(maxsize=None)
def _parameters(kernel) -> frozenset:
    """The kernel's parameter names, read once (the call runs in every layer of every packed step)."""
    return frozenset(inspect.signature(kernel).parameters)


def _cuda_varlen(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scaling: float | None) -> torch.Tensor:
    """``q [T, H, D]``, ``k/v [S, H_kv, D]`` -> ``[T, H, D]`` through PyTorch's varlen flash kernel, causal."""
    kernel = torch_varlen_kernel()
    params = _parameters(kernel)  # the signature changed across torch 2.10 - 2.12
    kwargs = {}
    if "scale" in params:
        kwargs["scale"] = scaling
    elif scaling is not None:  # torch 2.10 scales by 1/sqrt(D) only
        q = q * (scaling * q.shape[-1] ** 0.5)
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    elif k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    if "window_size" in params:  # newer torch: causal is the window (-1, 0)
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    return kernel(q.contiguous(), k.contiguous(), v.contiguous(), cu_q.to(q.device, torch.int32),
                  cu_k.to(q.device, torch.int32), max_q, max_k, **kwargs)
