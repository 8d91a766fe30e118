"""embedder: train and serve text embedding models with JAX/Flax."""

__version__ = "0.1.0"
