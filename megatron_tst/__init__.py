"""megatron-tst: Token-Superposition Training (TST) as a thin plugin over NVIDIA Megatron-Core.

The plugin API (`__all__`; what tools/example_plugin.py plugs into a Megatron-LM style training loop):

    TSTConfig                          bag size s, phase length, within-bag weighting (config.py)
    superposed_embedding, build_bag_targets, make_superposition_batch, make_stock_batch
                                       bags in, next bags out; the micro-batches of both phases (superposition.py)
    vocab_parallel_multi_hot_cross_entropy, fused_linear_vocab_parallel_multi_hot_cross_entropy
                                       the MCE over vocab-sharded logits, and fused with the output layer (mce.py)
    TSTGPTModel, GPTModelOptions, build_gpt_model, model_provider
                                       Megatron-Core's GPTModel with superposed inputs and the MCE (model.py)
    loss_func                          the loss of Megatron's schedule protocol for both phases; its
                                       `forward_step` is `megatron_tst.forward_step.forward_step` (forward_step.py)
    IGNORE_INDEX, WEIGHTINGS, LM_LOSS, MCE_LOSS

The trainer (`python -m megatron_tst.pretrain`) lives in `megatron_tst.training`; what megatron-core needs on CPU
and every bend of its internals in `megatron_tst.platform`. Names are imported on first use (PEP 562), so that
`import megatron_tst` stays cheap.
"""

import importlib

__version__ = "0.1.0"

_HOME = {
    "TSTConfig": "config",
    "superposed_embedding": "superposition", "build_bag_targets": "superposition",
    "make_superposition_batch": "superposition", "make_stock_batch": "superposition",
    "vocab_parallel_multi_hot_cross_entropy": "mce", "fused_linear_vocab_parallel_multi_hot_cross_entropy": "mce",
    "IGNORE_INDEX": "mce", "WEIGHTINGS": "mce",
    "TSTGPTModel": "model", "GPTModelOptions": "model", "build_gpt_model": "model", "model_provider": "model",
    "loss_func": "forward_step", "LM_LOSS": "forward_step", "MCE_LOSS": "forward_step",
}
__all__ = sorted(_HOME)


def __getattr__(name):
    if name in _HOME:
        return getattr(importlib.import_module(f"megatron_tst.{_HOME[name]}"), name)
    raise AttributeError(f"module 'megatron_tst' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
