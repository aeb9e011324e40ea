"""megatron-tst: Token-Superposition Training (TST) as a thin plugin over NVIDIA Megatron-Core.

The plugin API (`__all__`; what `megatron_tst.pretrain` plugs into Megatron-LM's training loop):

    TSTConfig                          bag size s, phase length, within-bag weighting (config.py)
    superposed_embedding, build_bag_targets, make_superposition_batch, make_stock_batch
                                       bags in, next bags out; the micro-batches of both phases (superposition.py)
    vocab_parallel_multi_hot_cross_entropy, fused_linear_vocab_parallel_multi_hot_cross_entropy
                                       the MCE over vocab-sharded logits, and fused with the output layer (mce.py)
    TSTGPTModel                        Megatron-Core's GPTModel with superposed inputs and the MCE (model.py)
    SamplePlan, TSTTrainDataset, Phase where the phases sit in Megatron's train samples (stream.py)
    model_provider, train_valid_test_datasets_provider, forward_step
                                       what Megatron-LM's `pretrain()` takes (loop/providers.py, loop/forward.py)
    IGNORE_INDEX, WEIGHTINGS, LM_LOSS, MCE_LOSS

The entry point (`python -m megatron_tst.pretrain`, a drop-in for Megatron-LM's pretrain_gpt.py) is
`megatron_tst.pretrain`; the pieces it hands Megatron-LM's loop are in `megatron_tst.loop`; what Megatron needs on
CPU, the release differences and every bend of Megatron's internals in `megatron_tst.platform`. Names are
imported on first use (PEP 562), so that `import megatron_tst` stays cheap.
"""

import importlib

from megatron_tst.platform.megatron_lm import prepare_import as _prepare_import

__version__ = "0.1.0"
_prepare_import()  # before anything imports megatron.training: Python 3.11 lacks typing.override (platform/)

_HOME = {
    "TSTConfig": "config",
    "superposed_embedding": "superposition", "build_bag_targets": "superposition",
    "make_superposition_batch": "superposition", "make_stock_batch": "superposition",
    "vocab_parallel_multi_hot_cross_entropy": "mce", "fused_linear_vocab_parallel_multi_hot_cross_entropy": "mce",
    "IGNORE_INDEX": "mce", "WEIGHTINGS": "mce",
    "TSTGPTModel": "model",
    "SamplePlan": "stream", "TSTTrainDataset": "stream", "Phase": "stream", "LM_LOSS": "stream", "MCE_LOSS": "stream",
    "model_provider": "loop.providers", "train_valid_test_datasets_provider": "loop.providers",
    "forward_step": "loop.forward",
}
__all__ = sorted(_HOME)


def __getattr__(name):
    if name in _HOME:
        return getattr(importlib.import_module(f"megatron_tst.{_HOME[name]}"), name)
    raise AttributeError(f"module 'megatron_tst' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
