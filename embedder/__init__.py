"""embedder: train and serve text embedding models with JAX/Flax.

    import embedder

    embedder.train(model="all-MiniLM-L6-v2", train_files=["pairs.jsonl"], model_dir="run", steps=100)
    vectors = embedder.Embedder.from_pretrained("run").encode(["a query"], kind="query")

The names below load on first use, so `import embedder` (and the command line)
stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Embedder", "train"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from embedder.api import train

        return train
    if name == "Embedder":
        from embedder.inference import Embedder

        return Embedder
    raise AttributeError(f"module 'embedder' has no attribute {name!r}")
