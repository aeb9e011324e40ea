"""Megatron-Core's config objects from parsed arguments (`arguments.parse_args`), as Megatron-LM builds them:
TransformerConfig (`core_transformer_config_from_args`), the GPTModel options, OptimizerConfig,
DistributedDataParallelConfig, and the model shape for FLOPs and memory estimates."""

from __future__ import annotations

from megatron_tst.training.arguments import linear_loss_fusion


def transformer_config_from_args(args, **overrides):
    """TransformerConfig as Megatron-LM's core_transformer_config_from_args builds it for these flags."""
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    from megatron_tst.platform import cpu, mcore_compat

    moe = {}
    if args.num_experts:
        moe = dict(
            num_moe_experts=args.num_experts, moe_router_topk=args.moe_router_topk,
            moe_ffn_hidden_size=args.moe_ffn_hidden_size or args.ffn_hidden_size,
            moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
            moe_layer_freq=args.moe_layer_freq, moe_aux_loss_coeff=args.moe_aux_loss_coeff,
            moe_z_loss_coeff=args.moe_z_loss_coeff,
            moe_router_load_balancing_type=args.moe_router_load_balancing_type,
            moe_router_score_function=args.moe_router_score_function,
            moe_router_pre_softmax=args.moe_router_pre_softmax,
            moe_router_topk_scaling_factor=args.moe_router_topk_scaling_factor,
            moe_router_enable_expert_bias=args.moe_router_enable_expert_bias,
            moe_router_bias_update_rate=args.moe_router_bias_update_rate,
            moe_router_dtype=args.moe_router_dtype, moe_token_dispatcher_type=args.moe_token_dispatcher_type,
            moe_expert_capacity_factor=args.moe_expert_capacity_factor, moe_grouped_gemm=args.moe_grouped_gemm,
            expert_model_parallel_size=args.expert_model_parallel_size,
            expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        )
    kwargs = dict(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups, kv_channels=args.kv_channels, ffn_hidden_size=args.ffn_hidden_size,
        normalization=args.normalization, layernorm_epsilon=args.norm_epsilon, qk_layernorm=args.qk_layernorm,
        gated_linear_unit=args.swiglu, activation_func=F.silu if args.swiglu else F.gelu,
        add_bias_linear=not args.disable_bias_linear, add_qkv_bias=args.add_qkv_bias,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std, use_cpu_initialization=args.use_cpu_initialization,
        params_dtype=args.params_dtype, bf16=args.bf16, fp16=args.fp16, pipeline_dtype=args.params_dtype,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size, sequence_parallel=args.sequence_parallel,
        recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers, calculate_per_token_loss=args.calculate_per_token_loss,
        deallocate_pipeline_outputs=True,
        **mcore_compat.kernel_fusion_settings(swiglu=args.swiglu, add_bias_linear=not args.disable_bias_linear),
        # Megatron-LM's switch for the fused output layer + loss (megatron_tst.model.FusedLossOutputLayer); the
        # native/te fused cross-entropy kernels are ignored (the stock loss runs).
        **(dict(cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="linear") if linear_loss_fusion(args)
           else {}),
        **moe,
    )
    kwargs.update(cpu.cpu_config_overrides())
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def model_options_from_args(args, padded_vocab_size: int):
    from megatron_tst.model import GPTModelOptions

    return GPTModelOptions(
        vocab_size=padded_vocab_size, max_sequence_length=args.max_position_embeddings,
        position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
        rotary_percent=args.rotary_percent, rope_scaling=args.use_rope_scaling,
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
    )


def optimizer_config_from_args(args):
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(
        optimizer=args.optimizer, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        sgd_momentum=args.sgd_momentum, clip_grad=args.clip_grad, bf16=args.bf16, fp16=args.fp16,
        params_dtype=args.params_dtype, use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_param_gather_with_optimizer_step=False,
    )


def ddp_config_from_args(args):
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=args.accumulate_allreduce_grads_in_fp32, overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather, use_distributed_optimizer=args.use_distributed_optimizer,
        bucket_size=args.ddp_bucket_size, check_for_nan_in_grad=False,
    )


def model_shape_from_args(args, padded_vocab_size: int):
    from megatron_tst.flops import ModelShape

    return ModelShape(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size, vocab_size=padded_vocab_size, num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels, swiglu=args.swiglu, num_experts=args.num_experts,
        moe_router_topk=args.moe_router_topk, moe_ffn_hidden_size=args.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
        moe_layer_freq=args.moe_layer_freq,
    )
