"""Hand a checkpoint back to Megatron-LM: load it with Megatron-LM's own trainer code and evaluate a fixed batch.

Test-only. Run with the Python of an environment whose megatron-core wheel contains `megatron.training`
(megatron-core 0.19.2), on CPU with gloo:

    python tests/megatron_lm/handback.py --batch BATCH.pt --out OUT.json -- <pretrain_gpt.py command line>
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/megatron_lm/handback.py ... (TP=2)

The command line after `--` is Megatron-LM's, as a user gives it to `pretrain_gpt.py`: `--load DIR`, optionally
`--use-checkpoint-args` (then the model arguments come from the checkpoint's saved `args`), `--no-load-rng` for
checkpoints written on CPU, `--transformer-impl local --distributed-backend gloo` and the fusions off for CPU.

What runs is Megatron-LM's own code, in the order `pretrain()` runs it:
`megatron.training.arguments.parse_and_validate_args` (parse_args, `load_args_from_checkpoint` with
--use-checkpoint-args, validate_args, set_global_variables), `megatron.training.initialize.initialize_megatron`,
then `megatron.training.training.setup_model_and_optimizer` with a GPT model provider that builds what
pretrain_gpt.py's `gpt_builder` builds for a local-spec GPT/MoE (GPTModel from `core_transformer_config_from_args`),
which builds the optimizer and scheduler and calls `megatron.training.checkpointing.load_checkpoint`. Then the mean
LM loss `sum(loss * loss_mask) / sum(loss_mask)` of the batch (`tokens`, `labels`, `loss_mask`, int64/float [b, s],
saved with torch.save) in eval mode, without gradients. Rank 0 writes OUT.json: loss (float32 value as a float),
iteration, consumed_train_samples, num_floating_point_operations_so_far, the LR and scheduler step count, and the
model arguments Megatron-LM ended up with.

Stand-ins, all for running Megatron-LM 0.19.2 on a CPU-only Python 3.11 machine (only the first and last apply
where CUDA is available), none touching what is loaded:
- `typing.override` (Python 3.12) is taken from typing_extensions: megatron/training/models/gpt.py imports it.
- megatron_tst.platform.cpu.enable(): megatron-core on CPU (CUDA devices -> CPU, inert streams, device RNG =
  CPU generator; see that module).
- `megatron.training.arguments.get_device_arch_version` answers 9 (Hopper): validate_args asks the GPU's compute
  capability when TP > 1 (then CUDA_DEVICE_MAX_CONNECTIONS=1 is required, as on Hopper; the test exports it).
- While `initialize_megatron` runs, `torch.cuda.device_count` answers 1: `_initialize_distributed` creates
  Megatron's model-parallel groups and `_set_random_seed` seeds the model-parallel RNG tracker only when a CUDA
  device exists (initialize.py:358/447).
- `initialize._compile_dependencies` is skipped: it runs `make` on the dataset C++ helpers inside the installed
  wheel, which a fixed batch does not use.
"""

import argparse
import contextlib
import json
import os
import sys


def _split_argv(argv):
    if "--" not in argv:
        raise SystemExit("usage: handback.py --batch BATCH.pt --out OUT.json -- <Megatron-LM pretrain_gpt.py args>")
    cut = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", required=True, help="torch.save'd dict: tokens, labels [b, s] int64, loss_mask")
    parser.add_argument("--out", required=True, help="JSON file written by rank 0")
    return parser.parse_args(argv[:cut]), argv[cut + 1:]


def _python311_typing_override():
    import typing

    if not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override


@contextlib.contextmanager
def _one_cuda_device_reported():
    import torch

    original = torch.cuda.device_count
    torch.cuda.device_count = lambda: 1
    try:
        yield
    finally:
        torch.cuda.device_count = original


def gpt_model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    """The GPTModel pretrain_gpt.py's `gpt_builder` builds for a local-spec GPT or MoE model (no yaml, legacy model,
    custom --spec, MTP or heterogeneous layers; those are refused)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
    from megatron.training import get_args
    from megatron.training.arguments import core_transformer_config_from_args

    args = get_args()
    unsupported = [name for name in ("yaml_cfg", "spec", "mtp_num_layers", "heterogeneous_layers_config_path",
                                     "experimental_attention_variant") if getattr(args, name, None)]
    if unsupported or args.transformer_impl != "local":
        raise SystemExit(f"handback.py builds local-spec GPT/MoE models only (--transformer-impl local); "
                         f"got transformer_impl={args.transformer_impl!r}, {unsupported}")
    if config is None:
        config = core_transformer_config_from_args(args)
    if args.num_experts:
        layer_spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                                normalization=args.normalization, qk_l2_norm=args.qk_l2_norm,
                                                vp_stage=vp_stage)
    else:
        layer_spec = get_gpt_layer_local_spec(num_experts=None, moe_grouped_gemm=args.moe_grouped_gemm,
                                              qk_layernorm=args.qk_layernorm,
                                              multi_latent_attention=args.multi_latent_attention,
                                              normalization=args.normalization)
    return GPTModel(config=config, transformer_layer_spec=layer_spec, vocab_size=args.padded_vocab_size,
                    max_sequence_length=args.max_position_embeddings, pre_process=pre_process,
                    post_process=post_process, fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
                    parallel_output=True,
                    share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                    position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
                    rotary_base=args.rotary_base, rope_scaling=args.use_rope_scaling, vp_stage=vp_stage,
                    pg_collection=pg_collection)


def mean_lm_loss(model_chunks, batch):
    """sum(per-token loss * loss_mask) / sum(loss_mask) on one batch, eval mode, no grad (a float)."""
    import torch

    model = model_chunks[0]
    device = next(model.parameters()).device
    tokens_bs, labels_bs = batch["tokens"].long().to(device), batch["labels"].long().to(device)
    loss_mask_bs = batch["loss_mask"].float().to(device)
    position_ids_bs = torch.arange(tokens_bs.shape[1], device=device).expand_as(tokens_bs).contiguous()
    for chunk in model_chunks:
        chunk.eval()
    with torch.no_grad():
        loss_bs = model(tokens_bs, position_ids_bs, None, labels=labels_bs)
    return float((loss_bs.float() * loss_mask_bs).sum() / loss_mask_bs.sum())


def _single_process_rendezvous():
    """Plain `python handback.py` (no torchrun): a 1-rank env:// rendezvous on a free local port."""
    if "WORLD_SIZE" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")


def main(argv):
    ours, megatron_argv = _split_argv(argv)
    _single_process_rendezvous()
    sys.argv = [sys.argv[0]] + megatron_argv  # Megatron-LM's parse_args reads sys.argv

    _python311_typing_override()
    import torch

    from megatron_tst.platform import cpu

    on_cpu = cpu.enable()  # False (and no stand-ins below) where CUDA is available

    import megatron.core
    from megatron.core.enums import ModelType
    from megatron.training import arguments as mlm_arguments
    from megatron.training import initialize as mlm_initialize
    from megatron.training.training import setup_model_and_optimizer

    if on_cpu:
        mlm_arguments.get_device_arch_version = lambda: 9
    args = mlm_arguments.parse_and_validate_args(args_defaults={"tokenizer_type": "GPT2BPETokenizer"})
    mlm_initialize._compile_dependencies = lambda: None
    with _one_cuda_device_reported() if on_cpu else contextlib.nullcontext():
        mlm_initialize.initialize_megatron(allow_no_cuda=on_cpu)

    model, optimizer, scheduler = setup_model_and_optimizer(ModelType.encoder_or_decoder, gpt_model_provider)
    batch = torch.load(ours.batch, weights_only=True)
    loss = mean_lm_loss(model, batch)

    if torch.distributed.get_rank() == 0:
        result = {
            "loss": loss,
            "iteration": args.iteration,
            "consumed_train_samples": args.consumed_train_samples,
            "num_floating_point_operations_so_far": args.num_floating_point_operations_so_far,
            "lr": optimizer.param_groups[0]["lr"],
            "scheduler_num_steps": scheduler.num_steps,
            "megatron_core_version": megatron.core.__version__,
            "world_size": args.world_size,
            "model_args": {name: getattr(args, name, None) for name in (
                "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "kv_channels", "seq_length", "max_position_embeddings", "position_embedding_type", "swiglu",
                "add_bias_linear", "normalization", "untie_embeddings_and_output_weights", "padded_vocab_size",
                "num_experts", "moe_ffn_hidden_size", "moe_router_topk", "tensor_model_parallel_size")},
        }
        with open(ours.out, "w") as f:
            json.dump(result, f, indent=1)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    main(sys.argv[1:])
