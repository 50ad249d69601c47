"""tiny_reranker.compat against the installed transformers: each private or version-dependent access still does
what the code relies on, so an upgrade that breaks one fails here, by name, before it breaks a run."""

from __future__ import annotations

import inspect
import types

import pytest
import torch

from tiny_reranker import compat
from tiny_reranker.modeling import load_base_model


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    return load_base_model(tiny_model_dir).eval()


def test_the_cache_keyword_and_the_returned_cache(tiny_lm):
    ids = torch.tensor([[1, 2, 3, 4]])
    out = tiny_lm(input_ids=ids, use_cache=True)
    cache = compat.output_cache(out)
    assert compat.cache_kwarg() in ("cache", "past_key_values") and compat.cache_kwarg() in out
    assert len(cache.layers) == tiny_lm.config.num_hidden_layers and cache.layers[0].keys.shape[-2] == 4


def test_a_prefix_cache_serves_the_prefix_then_the_forwards_own_keys(tiny_lm):
    """Running [prefix] then [rest] through compat.prefix_cache gives the last-token logits of [prefix + rest]."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        prefix = compat.output_cache(tiny_lm(input_ids=ids[:, :3], use_cache=True))
        layers = [(layer.keys, layer.values) for layer in prefix.layers]
        rest = tiny_lm(input_ids=ids[:, 3:], position_ids=torch.arange(3, 6)[None], use_cache=True,
                       attention_mask=torch.ones(1, 6, dtype=torch.long), **compat.prefix_cache(layers, 1))
        whole = tiny_lm(input_ids=ids)
    torch.testing.assert_close(rest.logits[:, -1], whole.logits[:, -1], rtol=0, atol=1e-5)
    assert [layer.keys.shape[-2] for layer in prefix.layers] == [3] * len(layers)  # nothing was appended to it


def test_activation_checkpointing_arguments_are_accepted_and_non_reentrant(tmp_path):
    from transformers import TrainingArguments

    targs = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **compat.checkpointing_arguments(True))
    name = next(k for k in compat.checkpointing_arguments(True) if not k.endswith("_kwargs"))
    assert getattr(targs, name) is True and getattr(targs, f"{name}_kwargs") == {"use_reentrant": False}
    assert getattr(TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                     **compat.checkpointing_arguments(False)), name) is False


def test_flag_name_lists():
    assert {"adamw_torch", "sgd"} <= set(compat.optimizer_names())
    assert {"wandb", "tensorboard"} <= set(compat.reporting_integrations())


def test_a_registered_attention_runs_and_is_reported(tiny_model_dir):
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return compat.sdpa_attention(*args, **kwargs)

    compat.register_attention("tiny_reranker_test_attention", counted)
    model = load_base_model(tiny_model_dir).eval()
    model.set_attn_implementation("tiny_reranker_test_attention")
    assert compat.attn_implementation(model) == "tiny_reranker_test_attention"
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    assert len(calls) == model.config.num_hidden_layers


def test_trainer_hooks_exist_where_compat_uses_them(tmp_path):
    from transformers import Trainer, TrainingArguments

    # the private hook LabelHeadTrainer overrides, and the attribute prepare_manual_steps sets, are still read
    assert "_get_eval_sampler" in dict(inspect.getmembers(Trainer))
    assert "current_gradient_accumulation_steps" in inspect.getsource(Trainer.training_step)
    model = torch.nn.Linear(2, 2)
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"))
    compat.disable_loss_kwargs(trainer)
    compat.prepare_manual_steps(trainer)
    assert trainer.model_accepts_loss_kwargs is False and trainer.current_gradient_accumulation_steps == 1


def test_the_eval_sampler_keeps_dataset_order_in_one_process():
    class Fake(compat.SequentialEvalSampler):
        def __init__(self, world_size):
            self.args = types.SimpleNamespace(world_size=world_size)

    assert list(Fake(1)._get_eval_sampler(list(range(5)))) == [0, 1, 2, 3, 4]
    assert Fake(2)._get_eval_sampler(list(range(5))) is None  # accelerate shards in order
    assert Fake(1)._get_eval_sampler(None) is None
