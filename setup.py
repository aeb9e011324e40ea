"""megatron-tst: Token-Superposition Training as a thin plugin over Megatron-LM's training loop."""

from setuptools import find_packages, setup

setup(
    name="megatron-tst",
    version="0.1.0",
    description="Token-Superposition Training (TST) for NVIDIA Megatron-Core",
    packages=find_packages(include=["megatron_tst", "megatron_tst.*"]),
    python_requires=">=3.10",
    # megatron-core 0.17-0.19 (NGC containers; their wheels hold Megatron-LM's loop, `megatron.training`), or a
    # Megatron-LM checkout on PYTHONPATH. torch is never pinned here: install the build you want first.
    install_requires=[
        "megatron-core>=0.17",
        "torch>=2.6",
        "numpy",
        "packaging",
        "psutil",  # megatron-core's async checkpoint writer hangs without it
        "transformers",  # Megatron's HuggingFace and GPT-2 BPE tokenizers
    ],
    extras_require={
        "test": ["pytest", "pytest-randomly", "ruff"],  # pytest-randomly: tools/test.sh --shuffled; ruff: ruff.toml
        "gpu": ["transformer-engine[pytorch]"],
        "text": ["tokenizers", "sentencepiece"],
        "logging": ["tensorboard"],
        "wandb": ["wandb"],
        "plots": ["matplotlib"],
        "yaml": ["pyyaml"],
    },
    entry_points={"console_scripts": ["megatron-tst-pretrain=megatron_tst.pretrain:main"]},
)
