"""Build the trainer's model/optimizer/schedule in an existing process group, from a command line.

For checkpoint tests that drive load/save/steps directly (in the pytest process or spawned workers) with
exactly the trainer's building blocks.
"""

import json
import os

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Checkpoints written by Megatron-LM 0.19.2 itself (tests/fixtures/megatron_lm/README.md), kept in the repository.
FIXTURES_DIR = os.path.join(_ROOT, "tests", "fixtures", "megatron_lm")


def fixtures_dir():
    """The Megatron-LM fixture checkpoints in the repository (`tests/fixtures/megatron_lm`)."""
    if not os.path.isfile(os.path.join(FIXTURES_DIR, "megatron_lm_gpt_tp1.json")):
        raise FileNotFoundError(f"{FIXTURES_DIR}: the Megatron-LM fixture checkpoints are missing from the checkout")
    return FIXTURES_DIR


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
        from megatron_tst.training import arguments
        from megatron_tst.training.build import build_components, setup_parallel
        from megatron_tst.training.step import StepSettings

        self.args = arguments.parse_args(argv + ["--mock-data"], world_size=world_size)
        self.args.padded_vocab_size = padded_vocab_size
        setup_parallel(self.args)
        components = build_components(self.args, padded_vocab_size)
        self.model, self.optimizer, self.scheduler = components.model, components.optimizer, components.scheduler
        self.settings = StepSettings.from_args(self.args)

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

        losses = evaluate(iter([batch(sequences)] * get_num_microbatches()), 1, self.model, self.settings)
        return losses.get("lm loss")  # None off the last pipeline stage

    def step(self, micro_batch_sequences):
        """One optimizer step on the given micro-batches (split over data-parallel ranks in order): the
        `StepResult` as a dict (losses, grad_norm, skipped)."""
        import dataclasses

        from megatron_tst.training.step import train_step

        return dataclasses.asdict(train_step(self._micro_batches(micro_batch_sequences), self.model,
                                             self.optimizer, self.settings, self.scheduler))


def batch(sequences):
    """A stock micro-batch from token sequences [b, L+1] (loss mask all ones, causal)."""
    from megatron_tst.superposition import make_stock_batch

    seq = torch.tensor(sequences)
    return make_stock_batch(seq[:, :-1], seq[:, 1:], torch.ones(seq[:, 1:].shape))
