"""Every private or version-dependent transformers access, in one place.

Each entry says what it reaches into, and which transformers versions need it (the toolkit supports
``transformers>=5.0,<6``; tested on 5.24). Nothing else in the package touches a private attribute of
a transformers object; ``tests/test_compat.py`` runs each entry against the installed version, so an
upgrade that breaks one fails there first, with its name.
"""

from __future__ import annotations

import functools

import torch


def _has_field(dataclass_type, name: str) -> bool:
    """Whether a transformers dataclass (an output or ``TrainingArguments``) has the field ``name``."""
    return name in dataclass_type.__dataclass_fields__


# ---------------------------------------------------------------------------
# Model outputs and the KV cache
# ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def cache_kwarg() -> str:
    """The forward's KV-cache keyword: ``cache`` in the transformers 5.x releases that renamed it, else
    ``past_key_values`` (5.0 and earlier 5.x)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if _has_field(CausalLMOutputWithPast, "cache") else "past_key_values"


def output_cache(out):
    """The KV cache a forward returned, under either name (see :func:`cache_kwarg`)."""
    return out["cache"] if "cache" in out else out["past_key_values"]


@functools.lru_cache(maxsize=None)
def _prefix_layer_class():
    """A ``transformers.cache_utils.DynamicLayer`` subclass (its constructor and attributes are not public API;
    transformers >= 5.0 has the layered ``Cache(layers=...)``). Defined on first use, so importing this module
    does not import transformers."""
    from transformers.cache_utils import DynamicLayer

    class PrefixLayer(DynamicLayer):
        """One layer's prefix keys/values ``[B, H_kv, P, D]``. :meth:`update` returns the prefix followed by
        the forward's own keys/values (picked by ``key_index`` if given) and stores nothing, so the prefix
        is never copied into a growing cache and one cache object serves one forward exactly as built."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, key_index: torch.Tensor | None = None):
            super().__init__()
            self.keys, self.values, self.key_index = keys, values, key_index
            self.device, self.dtype, self.is_initialized = keys.device, keys.dtype, True

        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)
            if self.key_index is not None:
                index = self.key_index.to(keys.device)
                keys, values = keys.index_select(-2, index), values.index_select(-2, index)
            return keys, values

    return PrefixLayer


def prefix_cache(layers, n_rows: int, key_index: torch.Tensor | None = None) -> dict:
    """``{cache keyword: Cache}`` whose every layer holds a fixed prefix's keys/values (viewed by ``n_rows`` rows)
    followed by the forward's own. ``layers``: ``[(keys [1, H_kv, P, D], values), ...]``."""
    from transformers import Cache

    layer = _prefix_layer_class()
    cache = Cache(layers=[layer(k.expand(n_rows, -1, -1, -1), v.expand(n_rows, -1, -1, -1), key_index)
                          for k, v in layers])
    return {cache_kwarg(): cache}


# ---------------------------------------------------------------------------
# Attention implementations
# ---------------------------------------------------------------------------
def attn_implementation(model) -> str:
    """The attention implementation a loaded model runs (``config._attn_implementation``; transformers has no
    public getter in 5.x)."""
    return model.config._attn_implementation


def register_attention(name: str, attention_fn) -> None:
    """Register ``attention_fn`` under ``name``, with sdpa's mask builder (``AttentionInterface`` is public;
    ``masking_utils.ALL_MASK_ATTENTION_FUNCTIONS`` and ``sdpa_mask`` are internal, transformers >= 5.0)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(name, attention_fn)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)


def sdpa_attention(*args, **kwargs):
    """transformers' own sdpa attention function (``integrations.sdpa_attention``, internal; transformers >= 4.48)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(*args, **kwargs)


# ---------------------------------------------------------------------------
# Trainer and TrainingArguments
# ---------------------------------------------------------------------------
def checkpointing_arguments(enabled: bool) -> dict:
    """Activation checkpointing for ``TrainingArguments``, under the name this transformers uses
    (``activation_checkpointing`` in the 5.x releases that renamed it, else ``gradient_checkpointing``).
    Non-reentrant: gradients reach the LoRA weights although the frozen embeddings need none."""
    from transformers import TrainingArguments

    name = "activation_checkpointing" if _has_field(TrainingArguments, "activation_checkpointing") \
        else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}


def optimizer_names() -> list[str]:
    """The ``--optim`` names this transformers knows (``training_args.OptimizerNames``, not re-exported)."""
    from transformers.training_args import OptimizerNames

    return [name.value for name in OptimizerNames]


def reporting_integrations() -> list[str]:
    """Every ``--report_to`` name this transformers knows, installed or not
    (``integration_utils.INTEGRATION_TO_CALLBACK``, internal; transformers >= 4.30)."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return sorted(INTEGRATION_TO_CALLBACK)


def disable_loss_kwargs(trainer) -> None:
    """Tell ``trainer`` that the loss is already a mean over the batch, so it divides by the accumulation steps
    itself. ``Trainer.__init__`` sets ``model_accepts_loss_kwargs`` from the model (transformers >= 4.46), over
    any class attribute; it has no public switch."""
    trainer.model_accepts_loss_kwargs = False


class SequentialEvalSampler:
    """A ``Trainer`` mixin: evaluation batches in dataset order (one process) or as accelerate shards them in
    order (torchrun). It overrides ``Trainer._get_eval_sampler``, a private hook (there is no public one in
    transformers 5.x): the stock one length-groups eval batches too under
    ``train_sampling_strategy="group_by_length"``, which misaligns predictions with the queries they belong to."""

    def _get_eval_sampler(self, eval_dataset):
        if eval_dataset is None or self.args.world_size > 1:
            return None
        return torch.utils.data.SequentialSampler(eval_dataset)


def load_trainer_state_file(path: str):
    """Load ``optimizer.pt`` / ``scheduler.pt`` / ``rng_state*.pth`` exactly as ``Trainer`` does on resume:
    ``torch.load(weights_only=True)`` inside ``trainer_pt_utils.safe_globals()`` (internal; it allowlists the
    numpy types of the RNG state, transformers >= 4.47). Garbage or a pickle that wants other globals raises
    here, before a run starts, instead of after the model has loaded."""
    from transformers.trainer_pt_utils import safe_globals

    with safe_globals():
        return torch.load(path, map_location="cpu", weights_only=True)


def prepare_manual_steps(trainer) -> None:
    """Let ``trainer.training_step`` run outside ``Trainer.train()`` (bench.py times it alone):
    ``current_gradient_accumulation_steps`` is set per step by ``train()`` (transformers >= 4.48)."""
    trainer.current_gradient_accumulation_steps = 1
