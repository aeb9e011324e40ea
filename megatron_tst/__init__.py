"""megatron-tst: Token-Superposition Training (TST) as a thin plugin over NVIDIA Megatron-Core.

Modules:
    config          TSTConfig: bag size, phase length, within-bag weighting (validated once).
    superposition   bag formation: superposed input embeddings and next-bag targets.
    mce             vocab-parallel multi-hot cross-entropy (autograd.Function).
    platform.cpu    what megatron-core needs to run on CPU with gloo (tests, CPU demo).
"""

__version__ = "0.1.0"
