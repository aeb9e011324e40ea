"""Megatron-Core's GPTModel with token superposition injected, thinly (`TSTGPTModel`).

The model is Megatron-Core's own `GPTModel`; `TSTGPTModel` adds no parameters or buffers, so its
`state_dict` / `sharded_state_dict` keys are the stock keys and checkpoints stay interchangeable with
Megatron-LM. It differs from `GPTModel` only when called with `tst_superposition=True`:

- first pipeline stage: the decoder input is `superposed_embedding(tokens [b, s*L])`, L positions;
- last pipeline stage: `labels` are next-bag targets [b, L, s] and the loss is the vocab-parallel MCE
  (per position, [b, L]) instead of the cross-entropy;
- everything between (transformer blocks, RoPE over L positions, MoE routing of L positions, pipeline
  communication of [L, b, h]) is Megatron's, unchanged.

Called without it (the recovery phase, and any baseline run), `forward` is `GPTModel.forward` itself.
The phase therefore switches per call, without rebuilding the model or the optimizer.

Fused output layer and loss (Megatron-LM's switch `--cross-entropy-loss-fusion --cross-entropy-fusion-impl
linear`, i.e. `config.cross_entropy_loss_fusion` and `config.cross_entropy_fusion_impl == "linear"`): on the last
stage, whenever labels are given (both phases, training and validation), the output layer returns the per-position
loss computed from the hidden states and its weight by `fused_linear_vocab_parallel_multi_hot_cross_entropy`
(s = 1 in stock steps) instead of logits, so no [L, b, V/tp] logits exist. The output layer stays the
ColumnParallelLinear GPTModel built (same parameter, keys and initialisation); only its class becomes
`FusedLossOutputLayer`, a subclass, as Megatron-LM's development branch makes its output layer a
`LinearCrossEntropyModule`. It is still called as a module, so hooks on it (the distributed optimizer's
parameter all-gather overlap) run as before. Without labels (inference) it returns logits as always.

MoE: a superposed position is one routed token. The router, its aux loss (coefficient unchanged) and the
expert load statistics count positions, which is what the experts process; the per-step token count of
the loss protocol counts positions with at least one target.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer import TransformerConfig

from megatron_tst.config import TSTConfig
from megatron_tst.mce import (
    IGNORE_INDEX,
    fused_linear_vocab_parallel_multi_hot_cross_entropy,
    vocab_parallel_multi_hot_cross_entropy,
)
from megatron_tst.superposition import superposed_embedding


def linear_loss_fusion_enabled(config: TransformerConfig) -> bool:
    """Megatron-LM's switch for the fused output layer + loss: `--cross-entropy-loss-fusion
    --cross-entropy-fusion-impl linear` (config fields `cross_entropy_loss_fusion`, `cross_entropy_fusion_impl`)."""
    return bool(getattr(config, "cross_entropy_loss_fusion", False)) and \
        getattr(config, "cross_entropy_fusion_impl", None) == "linear"


class FusedLossOutputLayer(ColumnParallelLinear):
    """Megatron's ColumnParallelLinear output layer that, while its model has targets pending for it, returns the
    fused per-position loss [L, b] (float32) instead of the logits [L, b, V/tp].

    Same parameters and collectives as ColumnParallelLinear (megatron/core/tensor_parallel/layers.py): under
    sequence parallelism the hidden states are all-gathered (here chunk by chunk) and their gradient
    reduce-scattered; otherwise their gradient is all-reduced over the TP group. Never constructed: the model
    re-classes the output layer GPTModel built (`TSTGPTModel.__init__`).
    """

    # (targets [L, b, s], weighting, ignore_index, loss weights [L, b] or None) during a fused forward
    _tst_pending = None

    def forward(self, input_, weight=None, runtime_gather_output=None, **kwargs):
        pending = self._tst_pending
        if pending is None:
            return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output, **kwargs)
        targets_lbs, weighting, ignore_index, loss_weights_lb = pending
        # With the loss weights (the loss mask forward_step's loss_func reduces with) the gradients are computed
        # in the forward: three GEMMs of the logits' size instead of four.
        loss_lb = fused_linear_vocab_parallel_multi_hot_cross_entropy(
            input_, self.weight if weight is None else weight, targets_lbs, ignore_index=ignore_index,
            weighting=weighting, tp_group=self.tp_group, sequence_parallel=self.sequence_parallel, validate=False,
            loss_weights=loss_weights_lb,
        )
        return loss_lb, None


def _check_linear_loss_fusion(model: GPTModel) -> None:
    """Refuse (ValueError) what the fused output layer + loss cannot compute as the stock path would."""
    config = model.config
    problems = []
    if getattr(config, "mtp_num_layers", None):
        problems.append("multi-token prediction (--mtp-num-layers)")
    if getattr(config, "use_mup", False):
        problems.append("MuP logit scaling (--use-mup)")
    if getattr(config, "defer_embedding_wgrad_compute", False):
        problems.append("--defer-embedding-wgrad-compute")
    if getattr(model, "fp16_lm_cross_entropy", False):
        problems.append("--fp16-lm-cross-entropy (the fused loss is float32)")
    layer = getattr(model, "output_layer", None)
    if type(layer) is not ColumnParallelLinear:
        problems.append(f"an output layer of type {type(layer).__name__} (it must be Megatron's ColumnParallelLinear)")
    elif layer.gather_output:
        problems.append("gathered output logits (parallel_output=False)")
    elif layer.bias is not None:
        problems.append("an output layer with a bias")
    if problems:
        raise ValueError("--cross-entropy-loss-fusion --cross-entropy-fusion-impl linear (the fused output layer and "
                         f"loss) does not support {'; '.join(problems)}: drop those settings, or use "
                         "--cross-entropy-fusion-impl native (the unfused loss)")


class TSTGPTModel(GPTModel):
    """Megatron-Core's GPTModel that can also run a superposition step (`tst_superposition=True`), and fuse the
    output layer with the loss in both phases when the config asks for Megatron-LM's linear loss fusion.

    Args:
        tst: bag size / weighting / ignore index for superposition steps; None builds a model that only
            runs stock steps (a baseline).
        Everything else: exactly `GPTModel`'s arguments.

    Raises:
        ValueError: the linear loss fusion is requested with something it cannot compute (see
            `_check_linear_loss_fusion`).
    """

    def __init__(self, *args, tst: Optional[TSTConfig] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.tst = tst
        self._mce_active = False  # True only inside a superposition forward
        self._fused_loss_active = False  # True only inside a forward whose output layer returns the loss
        self.fuse_output_loss = linear_loss_fusion_enabled(self.config) and self.post_process
        if self.fuse_output_loss:
            _check_linear_loss_fusion(self)
            self.output_layer.__class__ = FusedLossOutputLayer  # adds no state: keys, init and hooks unchanged

    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, labels=None,
                *args, tst_superposition: bool = False, **kwargs):
        """`GPTModel.forward`; with `tst_superposition=True`, a superposition step.

        Superposition shapes: input_ids [b, s*L] (first stage), labels = next-bag targets [b, L, s]
        (last stage, `ignore_index` where absent). Returns the per-position MCE [b, L] on the last stage
        (hidden states [L, b, h] elsewhere). position_ids [b, L]: the bags' positions, for learned absolute
        position embeddings (default 0..L-1; required under context parallelism, where a rank holds two chunks
        of the bags: `make_superposition_batch` provides them and Megatron's CP slicing cuts them).
        With the linear loss fusion, steps with labels on the last stage get their loss from the fused output
        layer (`FusedLossOutputLayer`); 0.19's `output_processor`, when given, keeps the stock output layer.
        """
        fuse = (self.fuse_output_loss and labels is not None and kwargs.get("output_processor") is None
                and kwargs.get("inference_context") is None)
        if not tst_superposition:
            if not fuse:
                return super().forward(input_ids, position_ids, attention_mask, decoder_input, labels, *args, **kwargs)
            # A stock step through the fused output layer: targets [L, b, 1], the cross-entropy, reduced with
            # Megatron's loss mask (forward_step passes it) when there is one.
            loss_mask = kwargs.get("loss_mask")
            with self._fused_loss(labels.transpose(0, 1).unsqueeze(-1), "uniform",
                                  self.tst.ignore_index if self.tst else IGNORE_INDEX,
                                  None if loss_mask is None else loss_mask.transpose(0, 1).float()):
                return super().forward(input_ids, position_ids, attention_mask, decoder_input, labels, *args, **kwargs)
        if self.tst is None:
            raise RuntimeError("this model was built without TST settings; it cannot run a superposition step")
        if kwargs.get("packed_seq_params") is not None or kwargs.get("inference_context") is not None:
            raise ValueError("superposition steps support neither packed sequences nor inference")
        if self.pre_process and decoder_input is None:
            if (position_ids is None and self.embedding.add_position_embedding
                    and self.pg_collection.cp.size() > 1):
                raise ValueError("a superposition step with learned absolute position embeddings under context "
                                 "parallelism needs the bags' position_ids [b, L] (make_superposition_batch "
                                 "provides them; the CP slicing cuts them with the bags)")
            decoder_input = superposed_embedding(self.embedding, input_ids, self.tst.bag_size,
                                                 position_ids_bl=position_ids)
        if labels is not None and (labels.dim() != 3 or labels.shape[-1] != self.tst.bag_size):
            raise ValueError(f"superposition labels must be next-bag targets [b, L, {self.tst.bag_size}], "
                             f"got shape {tuple(labels.shape)}")
        self._mce_active = True
        try:
            if fuse:
                # A superposition step's loss mask is its positions with targets (make_superposition_batch).
                targets_lbs = labels.transpose(0, 1)
                has_target_lb = (targets_lbs != self.tst.ignore_index).any(dim=-1).float()
                with self._fused_loss(targets_lbs, self.tst.weighting, self.tst.ignore_index, has_target_lb):
                    return super().forward(None, None, attention_mask, decoder_input, labels, *args, **kwargs)
            return super().forward(None, None, attention_mask, decoder_input, labels, *args, **kwargs)
        finally:
            self._mce_active = False

    @contextlib.contextmanager
    def _fused_loss(self, targets_lbs, weighting, ignore_index, loss_weights_lb=None):
        """Within: the output layer returns the fused loss for `targets_lbs` [L, b, s] instead of logits
        (`loss_weights_lb` [L, b]: what the loss function reduces it with, or None)."""
        self.output_layer._tst_pending = (targets_lbs, weighting, ignore_index, loss_weights_lb)
        self._fused_loss_active = True
        try:
            yield
        finally:
            self.output_layer._tst_pending = None
            self._fused_loss_active = False

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Per-position loss [b, L]: the MCE in a superposition step, else Megatron's cross-entropy; with the
        fused output layer, `logits` already is the per-position loss [L, b]."""
        if self._fused_loss_active:
            return logits.transpose(0, 1).contiguous()
        if not self._mce_active and not self.fuse_output_loss:
            return super().compute_language_model_loss(labels, logits)
        # The MCE; also Megatron's cross-entropy (s = 1) for logits that reach here with the linear fusion
        # configured (e.g. 0.19's output_processor), which Megatron-Core's own loss does not know.
        targets_lbs = labels.transpose(0, 1) if self._mce_active else labels.transpose(0, 1).unsqueeze(-1)
        # The logits are a temporary of this forward: let the MCE reuse them, as Megatron's CE does.
        loss_lb = vocab_parallel_multi_hot_cross_entropy(
            logits, targets_lbs, ignore_index=self.tst.ignore_index if self.tst else IGNORE_INDEX,
            weighting=self.tst.weighting if self._mce_active else "uniform",
            tp_group=self.pg_collection.tp, inplace=True, validate=False,
        )
        return loss_lb.transpose(0, 1).contiguous()
