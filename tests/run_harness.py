"""Build the trainer's model/optimizer/schedule in an existing process group, from a command line.

For checkpoint tests that drive load/save/steps directly (in the pytest process or spawned workers) with
exactly the trainer's building blocks.
"""

import json
import os

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FIXTURE_DIRS = [os.environ.get("MEGATRON_TST_FIXTURES", ""),
                 os.path.join(_ROOT, "..", "shared", "fixtures", "megatron_lm"),
                 os.path.join(_ROOT, "shared", "fixtures", "megatron_lm")]


def fixtures_dir():
    """Where the Megatron-LM checkpoints of the shared fixtures are ($MEGATRON_TST_FIXTURES, ../shared or
    ./shared beside the checkout); skips the calling test when there are none."""
    import pytest

    for directory in _FIXTURE_DIRS:
        if directory and os.path.isfile(os.path.join(directory, "megatron_lm_gpt_tp1.json")):
            return os.path.normpath(directory)
    pytest.skip("the Megatron-LM fixture checkpoints (shared/fixtures/megatron_lm) are not beside this checkout; "
                "set MEGATRON_TST_FIXTURES")


def fixture(name):
    """(fixture record, checkpoint directory) of a Megatron-LM fixture."""
    directory = fixtures_dir()
    with open(os.path.join(directory, f"{name}.json")) as f:
        return json.load(f), os.path.join(directory, name)


def fixture_argv(record, save_dir="/tmp/unused"):
    return record["megatron_cli_args_str"].replace("<checkpoint_dir>", save_dir).split()


class Trainer:
    """Model chunks, optimizer and LR schedule for `argv`, built as megatron_tst.pretrain builds them."""

    def __init__(self, argv, world_size=1, padded_vocab_size=1024):
        import torch.distributed as dist
        from megatron.core.num_microbatches_calculator import (
            destroy_num_microbatches_calculator, init_num_microbatches_calculator)

        from megatron_tst.training import arguments
        from megatron_tst.training.build import (
            build_model, build_optimizer_and_scheduler, configure_schedule_hooks, set_random_seed)

        self.args = arguments.parse_args(argv + ["--mock-data"], world_size=world_size)
        self.args.rank = dist.get_rank()
        self.args.padded_vocab_size = padded_vocab_size
        destroy_num_microbatches_calculator()
        init_num_microbatches_calculator(self.args.rank, None, self.args.global_batch_size,
                                         self.args.micro_batch_size, self.args.data_parallel_size)
        set_random_seed(self.args.seed)
        self.model = build_model(self.args, arguments.transformer_config_from_args(self.args),
                                 arguments.model_options_from_args(self.args, padded_vocab_size))
        self.optimizer, self.scheduler = build_optimizer_and_scheduler(self.args, self.model)
        configure_schedule_hooks(self.args, self.model, self.optimizer)

    def load(self):
        from megatron_tst.training import checkpointing

        checkpointing.check_load_arguments(self.args)
        return checkpointing.load_checkpoint(self.args, self.model, self.optimizer, self.scheduler)

    def save(self, state):
        from megatron_tst.training import checkpointing

        checkpointing.save_checkpoint(self.args, state, self.model, self.optimizer, self.scheduler)

    def _micro_batches(self, sequences_per_micro_batch):
        from megatron.core import parallel_state

        from megatron.core.num_microbatches_calculator import get_num_microbatches

        rank, size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        mine = [batch(s) for s in sequences_per_micro_batch]
        mine = mine[rank * len(mine) // size:(rank + 1) * len(mine) // size] if len(mine) >= size else mine
        assert len(mine) == get_num_microbatches(), (len(mine), get_num_microbatches())
        return iter(mine)

    def eval_loss(self, sequences):
        """LM loss on one batch of sequences [b, L+1], every data-parallel rank evaluating the same batch."""
        from megatron.core.num_microbatches_calculator import get_num_microbatches

        from megatron_tst.training.step import evaluate

        losses = evaluate(iter([batch(sequences)] * get_num_microbatches()), 1, self.model, self.args)
        return losses.get("lm loss")  # None off the last pipeline stage

    def train_step(self, micro_batch_sequences):
        """One optimizer step on the given micro-batches (split over data-parallel ranks in order)."""
        from megatron_tst.training.step import train_step

        return train_step(self._micro_batches(micro_batch_sequences), self.model, self.optimizer,
                          self.scheduler, self.args)


def batch(sequences):
    """Megatron's sample fields from token sequences [b, L+1] (loss mask all ones, causal)."""
    seq = torch.tensor(sequences)
    tokens, labels = seq[:, :-1], seq[:, 1:]
    return {"tokens": tokens, "labels": labels, "loss_mask": torch.ones(labels.shape),
            "position_ids": torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1).contiguous()}
