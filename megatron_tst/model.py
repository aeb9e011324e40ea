"""GPT and MoE model providers with token superposition injected, thinly.

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
import dataclasses
from typing import Optional

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer import TransformerConfig

from megatron_tst.config import TSTConfig
from megatron_tst.mce import (
    IGNORE_INDEX,
    fused_linear_vocab_parallel_multi_hot_cross_entropy,
    vocab_parallel_multi_hot_cross_entropy,
)
from megatron_tst.superposition import superposed_embedding


def transformer_engine_available() -> bool:
    """True when Transformer Engine imports (then its layer specs are used)."""
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA install
        return False
    return True


@dataclasses.dataclass(frozen=True)
class GPTModelOptions:
    """The `GPTModel` constructor arguments beyond the TransformerConfig (Megatron-LM flag in brackets).

    Attributes:
        vocab_size: the padded vocabulary size (Megatron-LM's `padded_vocab_size`).
        max_sequence_length: [--max-position-embeddings]
        position_embedding_type: "rope" or "learned_absolute" [--position-embedding-type]
        rotary_base: [--rotary-base]; rotary_percent: [--rotary-percent]; rope_scaling: [--use-rope-scaling]
        untie_embeddings_and_output_weights: [--untie-embeddings-and-output-weights]
        use_transformer_engine: layer specs from Transformer Engine; None = when it imports.
    """

    vocab_size: int
    max_sequence_length: int
    position_embedding_type: str = "rope"
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    rope_scaling: bool = False
    untie_embeddings_and_output_weights: bool = True
    use_transformer_engine: Optional[bool] = None

    def uses_transformer_engine(self) -> bool:
        if self.use_transformer_engine is None:
            return transformer_engine_available()
        if self.use_transformer_engine and not transformer_engine_available():
            raise ValueError("Transformer Engine layer specs were requested but transformer_engine does not import")
        return self.use_transformer_engine


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


def layer_spec(config: TransformerConfig, use_transformer_engine: bool, vp_stage: Optional[int] = None):
    """The layer (dense) or block (MoE) spec Megatron-LM's `gpt_builder` picks for this config."""
    if config.num_moe_experts:
        return get_gpt_decoder_block_spec(config, use_transformer_engine=use_transformer_engine,
                                          normalization=config.normalization, vp_stage=vp_stage)
    if use_transformer_engine:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    return get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, normalization=config.normalization)


def check_context_parallel_supported(config: TransformerConfig, use_transformer_engine: bool) -> None:
    """CP needs Transformer Engine's attention (with TST or without): refuse it at build time otherwise."""
    if config.context_parallel_size > 1 and not use_transformer_engine:
        raise ValueError("context parallelism needs Transformer Engine (megatron-core's local attention refuses "
                         "it): install transformer-engine or use --context-parallel-size 1")


def validate_tst_model(config: TransformerConfig, options: GPTModelOptions, tst: TSTConfig,
                       seq_length: Optional[int] = None, use_transformer_engine: bool = False) -> None:
    """Refuse, with clear errors, model settings that a superposition step cannot run correctly."""
    tst.check_layout(seq_length, tensor_parallel_size=config.tensor_model_parallel_size,
                     sequence_parallel=config.sequence_parallel, context_parallel_size=config.context_parallel_size,
                     pipeline_parallel_size=config.pipeline_model_parallel_size,
                     untie_embeddings_and_output_weights=options.untie_embeddings_and_output_weights)
    check_context_parallel_supported(config, use_transformer_engine)
    if options.position_embedding_type not in ("rope", "learned_absolute", "none"):
        raise ValueError(f"position embedding {options.position_embedding_type!r} is not supported with TST "
                         "(rope, learned_absolute or none)")
    unsupported = {
        "mtp_num_layers": "multi-token prediction",
        "multi_latent_attention": "multi-latent attention",
    }
    for field, what in unsupported.items():
        if getattr(config, field, None):
            raise ValueError(f"{what} is not supported with TST yet")


def build_gpt_model(
    config: TransformerConfig,
    options: GPTModelOptions,
    tst: Optional[TSTConfig] = None,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    pg_collection=None,
    seq_length: Optional[int] = None,
    model_class: type = TSTGPTModel,
) -> GPTModel:
    """Build one model chunk, as Megatron-LM's `gpt_builder` does, with TST settings attached.

    `seq_length` (the model's L in positions) lets the TST layout checks run at build time. `model_class=GPTModel`
    builds the unmodified Megatron-Core model from the same spec (a baseline to compare against).
    """
    use_te = options.uses_transformer_engine()
    if tst is not None:
        validate_tst_model(config, options, tst, seq_length=seq_length, use_transformer_engine=use_te)
    else:
        check_context_parallel_supported(config, use_te)
    extra = {"tst": tst} if issubclass(model_class, TSTGPTModel) else {}
    if tst is not None and not extra:
        raise ValueError(f"{model_class.__name__} cannot run superposition steps: build a TSTGPTModel for TST")
    return model_class(
        config=config,
        transformer_layer_spec=layer_spec(config, use_te, vp_stage),
        vocab_size=options.vocab_size,
        max_sequence_length=options.max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not options.untie_embeddings_and_output_weights,
        position_embedding_type=options.position_embedding_type,
        rotary_percent=options.rotary_percent,
        rotary_base=options.rotary_base,
        rope_scaling=options.rope_scaling,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
        **extra,
    )


def model_provider(
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    config: Optional[TransformerConfig] = None,
    pg_collection=None,
    *,
    options: GPTModelOptions,
    tst: Optional[TSTConfig] = None,
    seq_length: Optional[int] = None,
) -> TSTGPTModel:
    """A model provider in Megatron's convention: bind `options`/`tst`/`config` with functools.partial.

        provider = functools.partial(model_provider, config=config, options=options, tst=tst)
        model = provider(pre_process=True, post_process=True, vp_stage=None)
    """
    if config is None:
        raise ValueError("model_provider needs a TransformerConfig (bind it with functools.partial)")
    return build_gpt_model(config, options, tst, pre_process=pre_process, post_process=post_process,
                           vp_stage=vp_stage, pg_collection=pg_collection, seq_length=seq_length)
