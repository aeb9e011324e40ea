"""megatron-tst: Token-Superposition Training as a thin plugin over Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="megatron-tst",
    version="0.1.0",
    description="Token-Superposition Training (TST) for NVIDIA Megatron-Core",
    packages=find_packages(include=["megatron_tst", "megatron_tst.*"]),
    package_data={"megatron_tst.training": ["megatron_lm_flags.json"]},
    python_requires=">=3.10",
    # megatron-core 0.16.1 is pinned for development and CI in constraints.txt; the code stays on APIs
    # that exist through 0.19 (NGC containers). torch is never pinned here: install the build you want first.
    install_requires=[
        "megatron-core>=0.16.1",
        "torch>=2.6",
        "numpy",
        "packaging",
        "psutil",  # megatron-core's async checkpoint writer hangs without it
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
