"""The model and dataset providers TST hands Megatron-LM's `pretrain`, and `get_embedding_ranks`.

`model_provider` builds the model exactly as Megatron-LM's `gpt_builders.gpt_builder` builds it from the flags
(TransformerConfig from `core_transformer_config_from_args` or `--yaml-cfg`, `--spec`, the experimental-attention,
MoE-block, heterogeneous, Transformer Engine, inference-optimised or local layer spec), as
`megatron_tst.model.TSTGPTModel`: Megatron-Core's GPTModel with the superposed embedding and the MCE behind a
per-call flag, no extra parameters (stock state-dict keys). `train_valid_test_datasets_provider` is
`pretrain_gpt.py`'s for a run without `--tst-*` flags; with them the train split is TST's sample stream
(`megatron_tst.stream`) and validation and test read Megatron's stock samples of --seq-length, so that every run
(baseline, TST with any bag size) is evaluated on the same samples.
"""

from __future__ import annotations

import dataclasses
import json
from functools import partial
from typing import List, Optional

from megatron_tst.loop import run as tst_run
from megatron_tst.model import TSTGPTModel

# ------------------------------------------------------------------------------------------------------ model


def _layer_spec(args, config, vp_stage: Optional[int]):
    """The transformer layer (or block) spec `gpt_builder` picks for these flags."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.spec_utils import import_module

    from megatron_tst.platform.mcore_compat import layer_spec_kwargs

    if args.spec is not None:
        return import_module(args.spec)
    use_te = args.transformer_impl == "transformer_engine"
    if getattr(args, "experimental_attention_variant", None) is not None:
        from megatron.core.models.gpt.experimental_attention_variant_module_specs import (
            get_transformer_block_with_experimental_attention_variant_spec,
        )

        return get_transformer_block_with_experimental_attention_variant_spec(config=config, vp_stage=vp_stage)
    if args.num_experts:
        function = gpt_layer_specs.get_gpt_decoder_block_spec
        return function(config, **layer_spec_kwargs(function, use_transformer_engine=use_te,
                                                    normalization=args.normalization,
                                                    qk_l2_norm=getattr(args, "qk_l2_norm", False), vp_stage=vp_stage))
    if getattr(args, "heterogeneous_layers_config_path", None) is not None:
        from megatron.core.models.gpt.heterogeneous.heterogeneous_layer_specs import get_gpt_heterogeneous_layer_spec

        return get_gpt_heterogeneous_layer_spec(config, use_te)
    common = dict(num_experts=config.num_moe_experts, moe_grouped_gemm=config.moe_grouped_gemm,
                  qk_layernorm=config.qk_layernorm, multi_latent_attention=config.multi_latent_attention,
                  experimental_attention_variant=getattr(config, "experimental_attention_variant", None),
                  qk_l2_norm=getattr(config, "qk_l2_norm", False), use_kitchen=getattr(config, "use_kitchen", False),
                  use_kitchen_attention=getattr(config, "use_kitchen_attention", False),
                  kitchen_attention_backend=getattr(config, "kitchen_attention_backend", None))
    if use_te:
        function = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec
        return function(**layer_spec_kwargs(
            function, **common, use_te_activation_func=getattr(config, "use_te_activation_func", False),
            mla_down_proj_fusion=getattr(config, "mla_down_proj_fusion", False),
            use_grouped_gemm_for_dense_mlp=getattr(config, "use_grouped_gemm_for_dense_mlp", False)))
    if config.transformer_impl == "inference_optimized":
        function = gpt_layer_specs.get_gpt_layer_with_inference_spec
        return function(**layer_spec_kwargs(function, qk_layernorm=config.qk_layernorm,
                                            multi_latent_attention=config.multi_latent_attention,
                                            qk_l2_norm=getattr(config, "qk_l2_norm", False)))
    function = gpt_layer_specs.get_gpt_layer_local_spec
    return function(**layer_spec_kwargs(function, **common, normalization=config.normalization))


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None,
                   config=None, pg_collection=None) -> TSTGPTModel:
    """One model chunk, as Megatron-LM's `model_provider(gpt_builder, ...)` builds it, with TST's settings.

    Args: Megatron-LM's model-provider protocol (`megatron.training.training.get_model` passes them).
    Raises:
        ValueError: a model setting the fused output layer and loss cannot compute (`megatron_tst.model`).
    """
    return _build(TSTGPTModel, pre_process, post_process, vp_stage, config, pg_collection,
                  tst=tst_run.current().tst)


def stock_model_provider(pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None,
                         config=None, pg_collection=None):
    """Megatron-Core's unmodified GPTModel from the same flags (what Megatron-LM's gpt_builder builds), for tests and
    benchmarks that compare against it. Megatron-Core releases have no linear loss fusion: the stock model keeps the
    stock output layer and loss when `--cross-entropy-fusion-impl linear` is given."""
    from megatron.core.models.gpt import GPTModel
    from megatron.training import get_args
    from megatron.training.arguments import core_transformer_config_from_args

    config = config or core_transformer_config_from_args(get_args())
    if config.cross_entropy_fusion_impl == "linear":
        config = dataclasses.replace(config, cross_entropy_loss_fusion=False, cross_entropy_fusion_impl="native")
    return _build(GPTModel, pre_process, post_process, vp_stage, config, pg_collection)


def _build(model_class, pre_process, post_process, vp_stage, config, pg_collection, **extra):
    from megatron.training import get_args, print_rank_0
    from megatron.training.arguments import core_transformer_config_from_args

    args = get_args()
    print_rank_0(f"building GPT model ({model_class.__name__}) ...")
    _record_memory_history(args)
    if config is None:
        if args.yaml_cfg is not None:
            from megatron.training.yaml_arguments import core_transformer_config_from_yaml

            config = core_transformer_config_from_yaml(args, "language_model")
        else:
            config = core_transformer_config_from_args(args)
    return model_class(
        config=config,
        transformer_layer_spec=_layer_spec(args, config, vp_stage),
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=args.use_rope_scaling,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
        **extra,
    )


def _record_memory_history(args) -> None:
    """`--record-memory-history`, as Megatron-LM's `model_provider` starts it."""
    if not getattr(args, "record_memory_history", False):
        return
    import torch

    torch.cuda.memory._record_memory_history(True, trace_alloc_max_entries=100000, trace_alloc_record_context=True)

    def oom_observer(device, alloc, device_alloc, device_free):
        print("saving allocated state during OOM")
        torch.cuda.memory._dump_snapshot(f"oom_rank-{torch.distributed.get_rank()}_{args.memory_snapshot_path}")

    torch._C._cuda_attach_out_of_memory_observer(oom_observer)


def get_embedding_ranks(pp_ranks: List[int]) -> List[int]:
    """The pipeline ranks that hold word embeddings: the first, and the last with tied input/output embeddings
    (`pretrain_gpt.py`'s, without multi-token prediction, which TST refuses)."""
    from megatron.training import get_args

    ranks = [pp_ranks[0]]
    if len(pp_ranks) > 1 and not get_args().untie_embeddings_and_output_weights:
        ranks.append(pp_ranks[-1])
    return sorted(set(ranks))


# ------------------------------------------------------------------------------------------------------ data


def dataset_config(args, sequence_length: Optional[int] = None):
    """Megatron's GPTDatasetConfig as `pretrain_gpt.py`'s `core_gpt_dataset_config_from_args` builds it from the
    flags (the fields this release's config has), at `sequence_length` (default --seq-length)."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    from megatron.training.utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    sequences_per_dataset = None
    if getattr(args, "per_dataset_sequences_path", None) is not None:
        with open(args.per_dataset_sequences_path) as f:
            sequences_per_dataset = json.load(f)
    get = partial(getattr, args)
    candidates = {
        "random_seed": args.seed, "sequence_length": sequence_length or args.seq_length, "blend": blend,
        "blend_per_split": blend_per_split, "split": args.split,
        "multiple_validation_sets": get("multiple_validation_sets", False),
        "full_validation": get("full_validation", False),
        "num_dataset_builder_threads": get("num_dataset_builder_threads", 1), "path_to_cache": args.data_cache_path,
        "mmap_bin_files": get("mmap_bin_files", True), "tokenizer": build_tokenizer(args),
        "reset_position_ids": args.reset_position_ids, "reset_attention_mask": args.reset_attention_mask,
        "eod_mask_loss": args.eod_mask_loss, "create_attention_mask": args.create_attention_mask_in_dataloader,
        "object_storage_cache_path": get("object_storage_cache_path", None),
        "mid_level_dataset_surplus": get("mid_level_dataset_surplus", 0.005),
        "allow_ambiguous_pad_tokens": get("allow_ambiguous_pad_tokens", False),
        "fast_cache_load": get("dataloader_fast_cache_load", False), "sequences_per_dataset": sequences_per_dataset,
        "defer_npy_index_mmap": get("dataloader_defer_npy_index_mmap", False),
        "context_parallel_size": args.context_parallel_size, "data_parallel_size": args.data_parallel_size,
        "sequence_parallel_size": args.tensor_model_parallel_size * args.sequence_parallel,
        "hybrid_context_parallel": get("hybrid_context_parallel", False),
        "inter_document_masking": get("dataloader_inter_document_masking", False),
    }
    fields = {field.name for field in dataclasses.fields(GPTDatasetConfig)}
    return GPTDatasetConfig(**{name: value for name, value in candidates.items() if name in fields})


def split_sizes(config, sizes) -> list:
    """Megatron-LM's per-split sample counts, with None for a split that holds no document of any --data-path member
    (a small corpus under --split 969,30,1): Megatron's GPTDataset would look for samples there forever; None builds
    nothing for it (Megatron-LM then skips that evaluation). A member empty in a split the others fill is refused
    before heavy work (`data_checks.check_splits`)."""
    from megatron_tst.loop.data_checks import empty_splits

    sizes = list(sizes)
    if config.mock or config.blend_per_split is not None or config.blend[1] is not None:
        return sizes
    for index, empty in enumerate(empty_splits(config)):
        if index > 0 and empty and len(empty) == len(config.blend[0]):
            sizes[index] = None
    return sizes


def is_dataset_built_on_rank(vp_stage: Optional[int] = None) -> bool:
    """Datasets live on tensor-parallel rank 0 of the first and last pipeline stages (`pretrain_gpt.py`'s rule;
    `loop.forward.get_batch` broadcasts to the other TP ranks)."""
    from megatron.core import parallel_state
    from megatron.training.utils import is_first_or_last_pipeline_stage

    return parallel_state.get_tensor_model_parallel_rank() == 0 and is_first_or_last_pipeline_stage(vp_stage)


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage: Optional[int] = None):
    """(train, valid, test) datasets for Megatron-LM's loop (`pretrain_gpt.py`'s provider protocol).

    Without `--tst-*` flags: `pretrain_gpt.py`'s datasets (GPTDataset, MockGPTDataset, or GPTFIMDataset). With them:
    the train dataset is `stream.TSTTrainDataset` over Megatron's GPTDataset of windows of s*L tokens (or stock
    samples for the segments layout), validation and test Megatron's stock GPTDataset of --seq-length.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset
    from megatron.training import get_args, print_rank_0

    from megatron_tst.stream import TSTTrainDataset

    args = get_args()
    run = tst_run.current()
    built = partial(is_dataset_built_on_rank, vp_stage=vp_stage)
    if args.mock_data:
        cls = MockGPTDataset
    elif getattr(args, "fim_data", False):
        from megatron.training.datasets.fim_dataset import GPTFIMDataset

        cls = GPTFIMDataset
    else:
        cls = GPTDataset
    print_rank_0("> building train, validation, and test datasets for GPT ...")
    config = dataset_config(args)
    sizes = split_sizes(config, train_val_test_num_samples)
    if not run.plan.tst:
        train, valid, test = BlendedMegatronDatasetBuilder(cls, sizes, built, config).build()
        print_rank_0("> finished creating GPT datasets ...")
        return train, _none_if_empty(valid), _none_if_empty(test)
    plan = run.plan
    _, valid, test = BlendedMegatronDatasetBuilder(cls, [1, *sizes[1:]], built, config).build()
    windows = dataset_config(args, sequence_length=plan.source_sequence_length())
    source, _, _ = BlendedMegatronDatasetBuilder(
        cls, split_sizes(windows, [plan.source_samples_needed(), 1, 1]), built, windows).build()
    train = None if source is None else TSTTrainDataset(source, plan, ignore_index=run.tst.ignore_index)
    print_rank_0(f"> finished creating GPT datasets (TST train stream: {plan.sample_layout} rows of "
                 f"{plan.bag_size} x {plan.seq_length} tokens) ...")
    return train, _none_if_empty(valid), _none_if_empty(test)


def _none_if_empty(dataset):
    """A split without samples (`split_sizes`) as Megatron-LM's loop skips it: None (its sampler asserts on an
    empty dataset)."""
    return None if dataset is not None and not isinstance(dataset, list) and len(dataset) == 0 else dataset


train_valid_test_datasets_provider.is_distributed = True  # as pretrain_gpt.py: built on the ranks `built` names
