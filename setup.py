"""nuwa_jax: NUWA-Infinity in JAX/Flax, sharded for TPU pods, GPUs and CPUs."""

from setuptools import find_packages, setup

# Ranges that install together on Python 3.11 (checked 2026-11 with jax 0.10.2, flax 0.12.8,
# optax 0.2.8, orbax-checkpoint 0.12.8, grain 0.2.18, tensorflow-datasets 4.9.10).
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "jaxlib>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "tensorflow-datasets>=4.9.10,<4.10",
    "importlib_resources>=6",  # used by tensorflow-datasets 4.9.10, not declared by it
    "grain>=0.2.18,<0.3",
    "array-record>=0.8.6,<0.9",
    "sentencepiece>=0.2.3,<0.3",
    "ml-collections>=1.1,<1.2",
    "absl-py>=2.5,<3",
    "numpy>=2.0,<3",
    "pillow>=11,<14",
    "tensorboardX>=2.6.5,<3",
    "tqdm>=4.66,<5",
    "av>=14,<20",  # PyAV: video decoding
    # The embedded default data (sample_media) is read from these wheels' data folders.
    "scikit-image>=0.25,<0.27",
    "scikit-learn>=1.5,<2",
    # Only its two sample clips are used; it is never imported (its code predates numpy 2).
    # Its declared dependencies (numpy, scipy, pillow) are already required, so a plain
    # install equals the --no-deps one.
    "scikit-video==1.1.11",
    "scipy>=1.13,<2",
    "matplotlib>=3.9,<4",
    "regex>=2024",  # CLIP's byte-level BPE tokenizer (CLIP-SIM)
]

EXTRAS = {
    # torch only for the converter tests (a pure-torch reference model each); the CPU wheel.
    "test": ["pytest>=9,<10", "pytest-xdist>=3.8,<4", "dill>=0.4,<0.5", "torch==2.13.0",
             "ftfy>=6"],
    # Converting the metric networks' PyTorch files (nuwa_jax.tools.convert_*). CLIP's BPE
    # vocabulary comes from the clip-anytorch wheel, installed without its dependencies:
    # pip install --no-deps clip-anytorch==2.6.0
    "convert": ["torch>=2.4", "ftfy>=6"],
    # Cloud TPU VMs; also lets a CPU machine compile for TPU topologies (nuwa_jax.tools.aot).
    "tpu": ["jax[tpu]>=0.10.2,<0.11"],
    "cuda": ["jax[cuda12]>=0.10.2,<0.11"],
    # Optional: tf.data input pipelines. Everything else works without TensorFlow.
    "tf": ["tensorflow>=2.20"],
}

setup(
    name="nuwa_jax",
    version="0.1.0",
    description="NUWA-Infinity (autoregressive over autoregressive generation) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["nuwa_jax", "nuwa_jax.*", "configs", "configs.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
