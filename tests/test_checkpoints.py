"""Checkpoints: continue from Megatron-LM 0.19.2's own checkpoints, our layout round trip, resharding,
safe loading, and clear errors. (Resume after kill -9 and SIGTERM: test_resume.py.)"""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from run_harness import Trainer, fixture, fixture_argv
from text_corpus import build_byte_corpus

from megatron_tst.testing.distributed import Layout, run_distributed

FIXTURE_NAMES = ["megatron_lm_gpt_tp1", "megatron_lm_moe_tp1"]


def _rel(a, b):
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module", params=FIXTURE_NAMES)
def continued(request, megatron_single_process, tmp_path_factory):
    """Load a Megatron-LM checkpoint, evaluate, take Megatron's next step; then the same through our layout."""
    record, directory = fixture(request.param)
    out = {"record": record}
    trainer = Trainer(fixture_argv(record) + ["--load", directory])
    out["state"] = trainer.load()
    out["eval"] = trainer.eval_loss(record["eval_batch"]["sequences"])
    ours = str(tmp_path_factory.mktemp("ours"))
    trainer.args.save = ours
    trainer.save(out["state"])  # the running release's layout: common.pt up to 0.18, inside the shards on 0.19
    out["ours_files"] = sorted(os.listdir(os.path.join(ours, "iter_0000030")))
    out["step"] = trainer.step(record["continuation_reference"]["micro_batch_sequences"])
    out["eval_after"] = trainer.eval_loss(record["eval_batch"]["sequences"])

    again = Trainer(fixture_argv(record) + ["--load", ours])
    out["round_trip_state"] = again.load()
    out["round_trip_eval"] = again.eval_loss(record["eval_batch"]["sequences"])
    out["round_trip_step"] = again.step(record["continuation_reference"]["micro_batch_sequences"])
    return out


@pytest.mark.e2e
def test_megatron_lm_checkpoint_restores_iteration_samples_and_flops(continued):
    record, state = continued["record"], continued["state"]
    assert state.iteration == record["iteration"] == 30
    assert state.consumed_train_samples == record["consumed_train_samples"] == 120
    assert state.num_floating_point_operations_so_far == record["num_floating_point_operations_so_far"]


@pytest.mark.e2e
def test_fixed_batch_eval_loss_equals_megatron_lm(continued):
    assert continued["eval"] == continued["record"]["eval_loss_at_save"]  # bitwise


@pytest.mark.e2e
def test_next_step_reproduces_megatron_lm(continued):
    reference = continued["record"]["continuation_reference"]
    step = continued["step"]
    # Megatron-LM ran on the cu130 torch build, this is the CPU build: equal to float32 round-off (1 ulp).
    assert _rel(step["losses"]["lm loss"], reference["train_loss"]["lm loss"]) < 1e-6
    assert _rel(step["grad_norm"], reference["grad_norm"]) < 1e-6
    if "load_balancing_loss" in reference["train_loss"]:
        assert _rel(step["losses"]["load_balancing_loss"], reference["train_loss"]["load_balancing_loss"]) < 1e-6
    assert _rel(continued["eval_after"], reference["eval_loss_after"]) < 1e-6


@pytest.mark.e2e
def test_moe_step_reports_the_balancing_losses_megatron_tracks(megatron_single_process):
    """Each balancing type is logged under the name megatron-core's router tracks it with, z-loss too."""
    record, _ = fixture("megatron_lm_moe_tp1")
    for kind, name in (("seq_aux_loss", "seq_load_balancing_loss"), ("global_aux_loss", "global_load_balancing_loss")):
        trainer = Trainer(fixture_argv(record) + ["--moe-router-load-balancing-type", kind,
                                                  "--moe-z-loss-coeff", "1e-3"])
        losses = trainer.step(record["continuation_reference"]["micro_batch_sequences"])["losses"]
        assert losses[name] > 0 and losses["z_loss"] > 0 and "load_balancing_loss" not in losses, (kind, losses)


@pytest.mark.e2e
def test_round_trip_through_our_layout(continued):
    from megatron_tst.platform.mcore_compat import COMMON_STATE_IN_SHARDS

    # each release writes its own layout (the fixture, from 0.19.2, has no common.pt)
    assert ("common.pt" in continued["ours_files"]) == (not COMMON_STATE_IN_SHARDS)
    assert continued["round_trip_state"] == continued["state"]
    assert continued["round_trip_eval"] == continued["eval"]
    assert continued["round_trip_step"] == continued["step"]  # bitwise the same next step


@pytest.mark.e2e
def test_model_arguments_that_do_not_match_are_refused(megatron_single_process):
    record, directory = fixture("megatron_lm_gpt_tp1")
    argv = fixture_argv(record) + ["--load", directory, "--ffn-hidden-size", "256"]
    with pytest.raises(SystemExit, match="--ffn-hidden-size: checkpoint 128, this run 256"):
        Trainer(argv).load()


@pytest.mark.e2e
def test_optimizer_format_mismatch_is_a_clear_error(megatron_single_process):
    record, directory = fixture("megatron_lm_gpt_tp1")
    trainer = Trainer(fixture_argv(record) + ["--load", directory, "--use-distributed-optimizer"])
    with pytest.raises(SystemExit, match="holds the state of the non-distributed optimizer.*--no-load-optim"):
        trainer.load()
    weights_only = Trainer(fixture_argv(record) + ["--load", directory, "--use-distributed-optimizer",
                                                   "--no-load-optim"])
    assert weights_only.load().iteration == 30
    assert weights_only.eval_loss(record["eval_batch"]["sequences"]) == record["eval_loss_at_save"]


@pytest.mark.e2e
def test_missing_checkpoint_semantics(megatron_single_process, tmp_path):
    record, _ = fixture("megatron_lm_gpt_tp1")
    trainer = Trainer(fixture_argv(record) + ["--load", str(tmp_path)])
    assert trainer.load().iteration == 0  # Megatron-LM: nothing to load, start from scratch
    strict = Trainer(fixture_argv(record) + ["--load", str(tmp_path), "--exit-on-missing-checkpoint"])
    with pytest.raises(SystemExit, match="no checkpoint"):
        strict.load()


@pytest.mark.e2e
def test_finetune_loads_weights_only(megatron_single_process):
    record, directory = fixture("megatron_lm_gpt_tp1")
    trainer = Trainer(fixture_argv(record) + ["--load", directory, "--finetune"])
    state = trainer.load()
    assert state.iteration == 0 and state.consumed_train_samples == 0
    assert trainer.eval_loss(record["eval_batch"]["sequences"]) == record["eval_loss_at_save"]


@pytest.mark.e2e
@pytest.mark.parametrize("optimizer", ["float16", "distributed"])
@pytest.mark.parametrize("weights_only", ["--finetune", "--no-load-optim"])
def test_bf16_weights_only_load_steps_from_the_loaded_weights(megatron_single_process, weights_only, optimizer):
    """bf16 keeps fp32 main weights in the optimizer: a load without the optimizer state refreshes them, so a step
    at LR 0 leaves the loaded weights as they are (not the initialization's)."""
    record, directory = fixture("megatron_lm_gpt_tp1")
    argv = fixture_argv(record) + ["--bf16", "--load", directory, weights_only, "--lr", "0", "--min-lr", "0",
                                   "--lr-warmup-iters", "0", "--override-opt_param-scheduler"]
    trainer = Trainer(argv + (["--use-distributed-optimizer"] if optimizer == "distributed" else []))
    trainer.load()
    loaded = {name: p.detach().clone() for name, p in trainer.model[0].named_parameters()}
    trainer.step(record["continuation_reference"]["micro_batch_sequences"])
    for name, p in trainer.model[0].named_parameters():
        assert torch.equal(p.detach(), loaded[name]), name


@pytest.mark.e2e
def test_pretrained_checkpoint_and_ckpt_step(megatron_single_process, tmp_path):
    record, directory = fixture("megatron_lm_gpt_tp1")
    # --load has nothing yet: start from --pretrained-checkpoint's weights, counting from 0 (Megatron-LM)
    trainer = Trainer(fixture_argv(record) + ["--load", str(tmp_path), "--pretrained-checkpoint", directory])
    assert trainer.load().iteration == 0
    assert trainer.eval_loss(record["eval_batch"]["sequences"]) == record["eval_loss_at_save"]
    pinned = Trainer(fixture_argv(record) + ["--load", directory, "--ckpt-step", "30"])
    assert pinned.load().iteration == 30
    missing = Trainer(fixture_argv(record) + ["--load", directory, "--ckpt-step", "20"])
    with pytest.raises(SystemExit, match="iteration 20.*missing"):
        missing.load()


@pytest.mark.e2e
def test_save_after_a_ckpt_step_rollback_replaces_the_later_checkpoint(megatron_single_process, tmp_path, capsys):
    """--ckpt-step 30 in a --save directory that tracks 31: reaching 31 again saves the new lineage's state."""
    record, directory = fixture("megatron_lm_gpt_tp1")
    argv = fixture_argv(record, str(tmp_path))
    sequences, steps = record["eval_batch"]["sequences"], record["continuation_reference"]["micro_batch_sequences"]
    old = Trainer(argv + ["--load", directory])
    state = old.load()
    old.save(state)
    state.advance(4, 256, 0.0, 0.0)  # an "old lineage" iteration 31: the weights of 30
    old.save(state)
    old_eval = old.eval_loss(sequences)

    rolled = Trainer(argv + ["--load", str(tmp_path), "--ckpt-step", "30"])
    state = rolled.load()
    capsys.readouterr()
    rolled.save(state)  # the state just loaded from --save: nothing to write
    assert "saved checkpoint" not in capsys.readouterr().out
    rolled.step(steps)
    state.advance(4, 256, 0.0, 0.0)
    rolled.save(state)
    assert "saved checkpoint at iteration 31" in capsys.readouterr().out
    new_eval = rolled.eval_loss(sequences)

    reloaded = Trainer(argv + ["--load", str(tmp_path)])
    assert reloaded.load().iteration == 31
    assert reloaded.eval_loss(sequences) == new_eval != old_eval
    assert sorted(os.listdir(tmp_path)) == ["iter_0000030", "iter_0000031", "latest_checkpointed_iteration.txt"]


@pytest.mark.e2e
def test_exit_duration_and_interval(megatron_single_process):
    from megatron_tst.training.run_state import ExitConditions, TrainState

    record, _ = fixture("megatron_lm_gpt_tp1")
    args = Trainer(fixture_argv(record) + ["--exit-duration-in-mins", "1", "--exit-interval", "7"]).args
    conditions = ExitConditions(args)
    assert conditions.check(TrainState(iteration=3)) is None
    assert conditions.check(TrainState(iteration=7)) == "--exit-interval 7"
    conditions.start -= 61  # a minute has passed
    assert conditions.check(TrainState(iteration=3)) == "--exit-duration-in-mins 1"


@pytest.mark.unit
def test_loading_never_unpickles_arbitrary_code(tmp_path):
    from megatron_tst.training.checkpointing import UnknownMegatronObject, safe_torch_load

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(pickle.UnpicklingError):
        safe_torch_load(str(path))
    assert not (tmp_path / "pwned").exists()
    # A class of a newer megatron-core (e.g. an enum in a 0.19 checkpoint's args) becomes an inert stand-in.
    import megatron.core.transformer.enums as enums

    class FutureEnumFromV99:
        def __init__(self, value):
            self.value = value

        def __reduce__(self):
            return (FutureEnumFromV99, (self.value,))

    FutureEnumFromV99.__module__ = enums.__name__
    FutureEnumFromV99.__qualname__ = "FutureEnumFromV99"
    enums.FutureEnumFromV99 = FutureEnumFromV99
    torch.save({"e": FutureEnumFromV99(1)}, tmp_path / "future.pt")
    del enums.FutureEnumFromV99  # as if the class did not exist in this megatron-core
    loaded = safe_torch_load(str(tmp_path / "future.pt"))
    assert isinstance(loaded["e"], UnknownMegatronObject) and loaded["e"].args == (1,)


# ---------------------------------------------------------------------------------------------- resharding


def reshard_worker(record, fixture_dir, save_dir):
    """TP=2: load the TP=1 Megatron-LM checkpoint, check the loss, train a step, save. Then TP=1 and PP=2 load it."""
    from megatron_tst.testing.distributed import relayout

    argv = fixture_argv(record, save_dir)
    out = {}
    relayout(Layout(tp=2))
    tp2 = Trainer(argv + ["--tensor-model-parallel-size", "2", "--load", fixture_dir], world_size=2)
    state = tp2.load()
    out["tp2_fixture_eval"] = tp2.eval_loss(record["eval_batch"]["sequences"])
    tp2.step(record["continuation_reference"]["micro_batch_sequences"])
    state.advance(4, 256, 0.0, 0.0)
    tp2.save(state)
    out["tp2_saved_eval"] = tp2.eval_loss(record["eval_batch"]["sequences"])
    for name, layout, flags in (("tp1", Layout(), []),
                                ("pp2", Layout(pp=2), ["--pipeline-model-parallel-size", "2"])):
        relayout(layout)
        trainer = Trainer(argv + flags + ["--load", save_dir], world_size=2)
        loaded = trainer.load()
        out[f"{name}_iteration"] = loaded.iteration
        out[f"{name}_eval"] = trainer.eval_loss(record["eval_batch"]["sequences"])
    return out


@pytest.mark.e2e
def test_save_at_tp2_load_at_tp1_and_pp2(tmp_path):
    record, directory = fixture("megatron_lm_gpt_tp1")
    results = run_distributed(reshard_worker, world_size=2, layout=Layout(tp=2),
                              args=(record, directory, str(tmp_path / "tp2")))
    last = results[-1]  # the last rank is on the last pipeline stage in every layout
    assert last["tp2_fixture_eval"] == pytest.approx(record["eval_loss_at_save"], rel=1e-6)
    assert last["tp1_iteration"] == last["pp2_iteration"] == 31
    assert last["tp1_eval"] == pytest.approx(last["tp2_saved_eval"], rel=1e-6)
    assert last["pp2_eval"] == pytest.approx(last["tp2_saved_eval"], rel=1e-6)


# ---------------------------------------------------------------------------------------------- the CLI


@pytest.mark.e2e
def test_megatron_lm_command_line_continues_unchanged(tmp_path):
    """The command line recorded beside the checkpoint, with --load and a --data-path, runs with our entry point."""
    record, directory = fixture("megatron_lm_gpt_tp1")
    corpus = build_byte_corpus(str(tmp_path / "data"))
    argv = fixture_argv(record, str(tmp_path / "save")) + [
        "--load", directory, "--data-path", corpus, "--data-cache-path", str(tmp_path / "cache"),
        "--exit-interval", "32", "--log-interval", "1", "--eval-iters", "1", "--num-workers", "0"]
    result = subprocess.run([sys.executable, "-m", "megatron_tst.pretrain"] + argv, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "loaded checkpoint" in result.stdout and "iteration 30" in result.stdout
    assert "iteration       31/     100" in result.stdout and "consumed samples:          128" in result.stdout
    assert open(tmp_path / "save" / "latest_checkpointed_iteration.txt").read().strip() == "32"


@pytest.mark.e2e
def test_skip_train_evaluates_the_loaded_checkpoint(tmp_path):
    """Megatron-LM's --skip-train: load, evaluate on the validation split, train and save nothing."""
    record, directory = fixture("megatron_lm_gpt_tp1")
    corpus = build_byte_corpus(str(tmp_path / "data"))
    metrics = tmp_path / "metrics.jsonl"
    argv = fixture_argv(record, str(tmp_path / "save")) + [
        "--load", directory, "--data-path", corpus, "--data-cache-path", str(tmp_path / "cache"),
        "--eval-iters", "1", "--num-workers", "0", "--skip-train", "--metrics-jsonl", str(metrics)]
    result = subprocess.run([sys.executable, "-m", "megatron_tst.pretrain"] + argv, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in open(metrics)]
    assert [(r["iteration"], r["phase"]) for r in records if r["kind"] == "eval"] == [(30, "recovery")]
    assert not [r for r in records if r["kind"] == "train"] and not (tmp_path / "save").exists()
