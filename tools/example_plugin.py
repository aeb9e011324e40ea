"""TST inside your own Megatron-Core training code: the thin-plugin path (the README's example).

    python tools/example_plugin.py                              # CPU, 1 process
    torchrun --nproc-per-node 2 tools/example_plugin.py --tp 2  # tensor parallel: as many processes as --tp

Three pieces plug into an ordinary Megatron-Core loop: the model provider (Megatron's provider signature; its
model is Megatron-Core's GPTModel with stock state-dict keys), the superposition batch builder, and a
`forward_step` that follows Megatron's schedule protocol in both phases. The phase travels with the batch.

The example covers tensor parallelism only. Data parallelism (more processes than --tp) would also need the
model wrapped in Megatron-Core's DistributedDataParallel, its gradients reduced across replicas before the
optimizer step (`finalize_model_grads`), and a different slice of the batch on each data-parallel rank, as in
Megatron's own training loop; the trainer (megatron_tst/training/) does all of that.
"""

import argparse
import functools
import os

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig

from megatron_tst.config import TSTConfig
from megatron_tst.forward_step import forward_step
from megatron_tst.model import GPTModelOptions, model_provider
from megatron_tst.platform import cpu
from megatron_tst.superposition import make_superposition_batch

VOCAB, SEQ, BAG, MICRO_BATCH = 512, 32, 4, 2


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tp", type=int, default=1)
    tp = parser.parse_args().tp

    # Process groups as in any Megatron-Core script (cpu.enable() only matters on machines without CUDA).
    on_cpu = cpu.enable()
    if "RANK" not in os.environ:  # plain `python`: a 1-process world
        from megatron_tst.parallel import free_port

        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    torch.distributed.init_process_group("gloo" if on_cpu else "nccl")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)

    # 1. The provider: bind config, model options and TST settings; Megatron calls it with
    #    pre_process / post_process / vp_stage, as for its own GPT provider.
    config = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=tp, pipeline_dtype=torch.float32,
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        **cpu.cpu_config_overrides())
    provider = functools.partial(
        model_provider, config=config, options=GPTModelOptions(vocab_size=VOCAB, max_sequence_length=SEQ),
        tst=TSTConfig(bag_size=BAG, superposition_ratio=0.3), seq_length=SEQ)
    model = provider(pre_process=True, post_process=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    # 2. Batches. Superposition: s*L raw tokens per row -> {tokens [b, s*L], tst_targets [b, L, s], loss_mask};
    #    recovery: Megatron's usual {tokens, labels, loss_mask, position_ids} of L tokens.
    g = torch.Generator().manual_seed(1)
    stream = torch.randint(0, VOCAB, (MICRO_BATCH, BAG * SEQ + 1), generator=g)
    superposition = make_superposition_batch(stream[:, :-1], stream[:, 1:], None, BAG)
    stream = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=g)
    recovery = {"tokens": stream[:, :-1], "labels": stream[:, 1:], "loss_mask": torch.ones(MICRO_BATCH, SEQ),
                "position_ids": torch.arange(SEQ).expand(MICRO_BATCH, SEQ)}

    # 3. The same schedule call and forward_step in both phases.
    for phase, batch in (("superposition", superposition), ("recovery", recovery)):
        optimizer.zero_grad()
        reports = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([batch]), model=[model], num_microbatches=1,
            seq_length=SEQ, micro_batch_size=MICRO_BATCH, forward_only=False)
        optimizer.step()
        (name, (loss_sum, count)), = reports[0].items()
        if torch.distributed.get_rank() == 0:
            print(f"{phase}: {name} = {float(loss_sum / count):.4f} over {int(count)} positions")

    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
