"""tiny-reranker: Qwen3 + LoRA fine-tuned into a 4-class ESCI product reranker (E / S / C / I).

The public API::

    from tiny_reranker import Reranker
    rr = Reranker.from_pretrained("Qwen/Qwen3-0.6B", lora_model="outputs/lora")
    rr.rank("usb c charger", ["Anker 65W USB-C charger", "HDMI cable"])

The modules, one concern each (the scripts at the top of the checkout are thin runs over them):

* data and prompt: ``esci_dataset`` (beside this package: labels, label words, the template, validation),
  :mod:`~tiny_reranker.data_cache` (training splits tokenized once into memory-mapped Arrow);
* model: :mod:`~tiny_reranker.modeling` (loading, label head, LoRA, dtype), :mod:`~tiny_reranker.model_files`
  (which folders load), :mod:`~tiny_reranker.forward` (the label logits), :mod:`~tiny_reranker.batching`
  (pure layout), :mod:`~tiny_reranker.varlen` (packed-row attention), :mod:`~tiny_reranker.compat`
  (every private transformers access);
* scoring: :mod:`~tiny_reranker.scoring` (the one softmax and the score), :mod:`~tiny_reranker.reranker`
  (:class:`Reranker`), :mod:`~tiny_reranker.distributed` (sharded scoring under torchrun);
* training: :mod:`~tiny_reranker.train_config`, :mod:`~tiny_reranker.trainer`,
  :mod:`~tiny_reranker.checkpoints`;
* evaluation: :mod:`~tiny_reranker.metrics`, :mod:`~tiny_reranker.calibration`, :mod:`~tiny_reranker.report`,
  :mod:`~tiny_reranker.plots`;
* files: :mod:`~tiny_reranker.contract` (what a model folder promises), :mod:`~tiny_reranker.io`;
* scripts' share: :mod:`~tiny_reranker.cli` (the only argparse user), :mod:`~tiny_reranker.demo_model`
  (the tiny model and synthetic data), :mod:`~tiny_reranker.benchmark` (bench.py's reference recipes).
"""

from esci_dataset import LABEL_TEXT, LABELS, ESCIDataError
from tiny_reranker.scoring import OUTPUT_COLUMNS, PROB_COLUMNS, probs_from_logits, scores_from_probs

__all__ = ["LABELS", "LABEL_TEXT", "OUTPUT_COLUMNS", "PROB_COLUMNS", "ESCIDataError", "Reranker", "probs_from_logits",
           "scores_from_probs"]


def __getattr__(name: str):
    # Reranker imports torch and the model stack; `import tiny_reranker` alone stays light.
    if name == "Reranker":
        from tiny_reranker.reranker import Reranker

        return Reranker
    raise AttributeError(f"module 'tiny_reranker' has no attribute {name!r}")
