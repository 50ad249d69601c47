"""Which model folders the toolkit loads, checked before anything slow: the one home of model-path checks.

A base model is a local folder or a hub id (an id that is not cached must be reachable); an adapter is
a folder with ``adapter_config.json``. Only safetensors weights load (unpickling can run code), and a
LoRA adapter or a seq_cls export passed as the base model is refused: transformers would load either
quietly and score with other probabilities. Every failure is an :class:`ESCIDataError` naming the flag.
"""

from __future__ import annotations

import os

from esci_dataset import ESCIDataError
from tiny_reranker.contract import read_reranker_config
from tiny_reranker.io import read_json_object


def check_model_paths(base_model: str, lora_model: str | None = None) -> None:
    """Fail early, with :class:`ESCIDataError`, on a missing, pickle-only or unreachable model.

    ``base_model`` may be a hub id (``org/name``); strings that can only be local
    paths (absolute, ``./``, ``../``, ``~``, or more than one ``/``) must exist, and
    a hub id that is not cached must be reachable. Only safetensors weights load.
    """
    lora_model = os.path.expanduser(lora_model) if lora_model is not None else None
    if lora_model is not None:
        if not os.path.isdir(lora_model):
            raise ESCIDataError(f"lora_model {lora_model}: folder not found")
        if not os.path.isfile(os.path.join(lora_model, "adapter_config.json")):
            raise ESCIDataError(f"lora_model {lora_model}: no adapter_config.json, so not a LoRA adapter folder "
                                "(train.py writes one into its --output_dir)")
        check_safetensors_only(lora_model, "lora_model")
        config = check_adapter_config(lora_model)
        check_safetensors_readable(os.path.join(lora_model, "adapter_model.safetensors"))
        if "peft_type" not in config:  # peft's own KeyError otherwise
            raise ESCIDataError(f"lora_model {lora_model}: adapter_config.json has no peft_type, so peft cannot load "
                                "it as an adapter; copy the folder train.py wrote again")
    local_only = base_model.startswith(("/", "./", "../", "~")) or base_model.count("/") > 1
    folder = os.path.expanduser(base_model)
    if local_only and not os.path.isdir(folder):
        raise ESCIDataError(f"base_model {base_model}: folder not found")
    check_safetensors_only(folder, "base_model")
    check_base_model_kind(folder)
    check_hub_reachable(base_model, "base_model")


def check_base_model_kind(folder: str) -> None:
    """Refuse, as the base model, a LoRA adapter folder or a sequence classifier (``export.py --format seq_cls``).

    transformers loads either without complaint: an adapter through its peft integration (training would then
    stack a second LoRA on it and save a broken adapter), a classifier as a causal LM without its ``score``
    head, and with it the temperature folded into that head. Runs would succeed with other probabilities.
    """
    adapter_config = os.path.join(folder, "adapter_config.json")
    if os.path.isfile(adapter_config):
        trained_on = (read_reranker_config(folder) or {}).get("base_model")
        hint = f" (this one was trained on {trained_on})" if trained_on else ""
        raise ESCIDataError(
            f"base_model {folder}: a LoRA adapter folder (it holds adapter_config.json), not a base model. Pass it as "
            f"--lora_model, with the model it was trained on as --base_model{hint}; export.py --format merged turns "
            f"the two into one folder that works as a base model.")
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        return
    classifiers = [a for a in read_json_object(config_path).get("architectures") or []
                   if str(a).endswith("ForSequenceClassification")]
    if classifiers:
        raise ESCIDataError(
            f"base_model {folder}: a sequence classifier ({classifiers[0]}, as export.py --format seq_cls writes for "
            f"serving engines). Scoring here reads the causal LM's label-word logits, which would drop its score head "
            f"and the temperature folded into it. Pass the adapter (--lora_model) with its base model, or an "
            f"export.py --format merged folder.")


def safetensors_names(path: str) -> list[str]:
    """The tensor names in a safetensors file, every tensor's header read (a damaged file raises)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        names = list(f.keys())
        for name in names:
            f.get_slice(name)
    return names


def check_safetensors_readable(path: str) -> None:
    """A truncated or corrupt weights file is a user error naming it, not a traceback from the loader."""
    if not os.path.isfile(path):
        return
    try:
        safetensors_names(path)
    except Exception as exc:  # safetensors raises its own error type for every kind of damage
        raise ESCIDataError(f"{path}: unreadable safetensors file ({str(exc).splitlines()[0]}); "
                            "it may be truncated: copy it again or re-run the export/training") from None


def check_adapter_config(lora_model: str) -> dict:
    """``adapter_config.json``; an empty or corrupt one is a user error, not a traceback from peft."""
    return read_json_object(os.path.join(lora_model, "adapter_config.json"))


PICKLE_WEIGHT_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin", "training_args.bin")


def _is_pickle_weights(name: str) -> bool:
    return name in PICKLE_WEIGHT_NAMES[:3] or (name.startswith("pytorch_model-") and name.endswith(".bin"))


def _is_safetensors_weights(name: str) -> bool:
    """The names transformers and peft load weights from: model(-0000i-of-0000n).safetensors (+ index),
    adapter_model.safetensors. Any other ``*.safetensors`` in the folder is not what would be loaded."""
    return name in ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors") or (
        name.startswith("model-") and name.endswith(".safetensors"))


def check_safetensors_only(folder: str, what: str) -> None:
    """Refuse a folder whose weights exist only as pickles: unpickling can run code. ESCIDataError otherwise.

    A pickle next to an unrelated ``*.safetensors`` file is still refused: the loaders would read the pickle.
    """
    if not os.path.isdir(folder):
        return
    names = os.listdir(folder)
    if any(_is_safetensors_weights(n) for n in names):
        return
    pickles = sorted(n for n in names if _is_pickle_weights(n))
    if pickles:
        raise ESCIDataError(
            f"{what} {folder}: holds only pickle weights ({', '.join(pickles)}). Only safetensors are loaded, because "
            "loading a pickle can run code. In a trusted environment, load it once with transformers (or peft for an "
            "adapter) and save_pretrained() it to a new folder: safetensors is the default format.")


def check_hub_reachable(name: str, what: str, timeout: float = 10.0) -> None:
    """For a hub id that is not in the local cache, fail in seconds when the hub cannot be reached.

    Without this, an offline machine spends most of a minute in download retries before the
    same error. Local folders and cached ids are not checked.
    """
    if os.path.isdir(os.path.expanduser(name)):
        return
    from huggingface_hub import HfApi, constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    if constants.HF_HUB_OFFLINE:
        raise ESCIDataError(f"{what} {name!r} is not a local folder, is not in the Hugging Face cache, and "
                            "HF_HUB_OFFLINE is set; download it where there is network and pass the local folder instead")
    if name in _REACHABLE_HUB_IDS:  # the CLIs check before reading input, then again when loading
        return
    try:
        HfApi().model_info(name, timeout=timeout)
    except Exception as exc:  # unreachable host, unknown repo, gated repo: all mean "pass a local folder"
        raise ESCIDataError(f"{what} {name!r} is not a local folder and could not be fetched from the Hugging Face "
                            f"hub ({type(exc).__name__}); download it where there is network and pass the "
                            "local folder instead") from None
    _REACHABLE_HUB_IDS.add(name)


_REACHABLE_HUB_IDS: set[str] = set()  # hub ids this process already found reachable
