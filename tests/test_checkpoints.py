"""Continuing the checkpoints Megatron-LM 0.19.2 wrote (tests/fixtures/megatron_lm/, dense and MoE) through our
entry point and providers, on the megatron-core the suite runs under (0.17.1 and 0.19.2).

Each fixture's own command line (`megatron_cli_args_str`, its `--save` pointed elsewhere) plus `--load DIR` and what
a CPU run of `megatron_tst.pretrain` needs that the fixture's generator did not (Megatron's mock data: the fixture
trained on a synthetic stream of its own; `--eval-interval`: Megatron-LM 0.19 needs it to count evaluation samples).
On megatron-core < 0.18 the NullTokenizer adds the end-of-document id to --vocab-size: there `--vocab-size 1023` is
the checkpoint's 1024 ids (the literal flag is refused, naming 1023: `test_another_null_tokenizer_vocabulary_...`).

In one spawned process (world size 1, as the fixtures were written): Megatron-LM's `initialize` path
(`mcore_compat.initialize`: parse + validate with our flags, `pretrain.start_run`, `initialize_megatron`), then
Megatron-LM's own `setup_model_and_optimizer` with our `model_provider` (its `load_checkpoint` loads the model,
optimizer, scheduler, RNG and rerun state), the fixed batch through our `forward_step` in eval mode (Megatron's
forward-only schedule), and Megatron-LM's own `train_step` with our `forward_step` on the micro-batches Megatron-LM
trained on after saving. The fixture records what Megatron-LM computed: every number here equals it bitwise.
Then the real entry (`run_pretrain`, in process) continues each checkpoint by one step and saves.
"""

import json
import math
import os

import pytest
from cli import read_jsonl, run_in_workers

from megatron_tst.platform.mcore_compat import MCORE_VERSION

pytestmark = pytest.mark.e2e

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "megatron_lm")
FIXTURES = ["megatron_lm_gpt_tp1", "megatron_lm_moe_tp1"]
# megatron-core < 0.18: NullTokenizer(V) has V + 1 ids (end of document V); >= 0.18: V ids (end of document V - 1)
NULL_TOKENIZER_ADDS_EOD = MCORE_VERSION.minor < 18
VOCAB_FLAG = "1023" if NULL_TOKENIZER_ADDS_EOD else "1024"  # the fixtures' 1024 token ids on this release
CPU_RUN = ["--mock-data", "--eval-interval", "1000", "--eval-iters", "0", "--num-workers", "0"]
TST_SEGMENTS = ["--tst-bag-size", "4", "--tst-superposition-iters", "0", "--tst-sample-layout", "segments"]


def load_record(name):
    with open(os.path.join(ROOT, f"{name}.json")) as f:
        return json.load(f)


def fixture_argv(record, save_dir, vocab=VOCAB_FLAG):
    """The fixture's Megatron-LM command line, --save at `save_dir`, --vocab-size `vocab`, plus `CPU_RUN`."""
    argv = record["megatron_cli_args_str"].replace("<checkpoint_dir>", str(save_dir)).split()
    argv[argv.index("--vocab-size") + 1] = vocab
    return argv + CPU_RUN


# ------------------------------------------------------------------------------------------- in-process helpers
# (also used by test_handback.py)


def initialize(argv, on_validated=None, extra_args_provider="tst"):
    """Megatron-LM's set-up of a run of `argv` up to (not including) the model: our `pretrain.prepare`, then parse +
    validate (+ `on_validated`, default TST's `pretrain.start_run`) + `initialize_megatron`, as `pretrain` orders
    them on this release. `extra_args_provider=None`: Megatron-LM's flags only (a stock run)."""
    from megatron_tst import pretrain
    from megatron_tst.loop import arguments
    from megatron_tst.loop.providers import get_embedding_ranks
    from megatron_tst.platform import mcore_compat
    from megatron_tst.testing.megatron_lm import teardown

    teardown()
    pretrain.prepare(argv)
    mcore_compat.initialize(extra_args_provider=arguments.add_arguments if extra_args_provider == "tst" else None,
                            args_defaults=pretrain.ARGS_DEFAULTS,
                            on_validated=on_validated or pretrain.start_run, get_embedding_ranks=get_embedding_ranks)


def setup(model_provider=None):
    """Megatron-LM's `setup_model_and_optimizer` (keywords: its signature differs between releases) with our
    `model_provider` by default; returns (model chunks, optimizer, scheduler)."""
    from megatron.core.enums import ModelType
    from megatron.training import training

    from megatron_tst.loop import providers

    return training.setup_model_and_optimizer(model_provider_func=model_provider or providers.model_provider,
                                              model_type=ModelType.encoder_or_decoder)


def stock_micro_batch(sequences):
    """A Megatron-LM micro-batch of sequences [b, L + 1]: tokens / labels the first / last L, loss mask ones,
    positions 0..L-1, the causal attention mask (True = masked), as the fixtures' generator built them."""
    import torch

    seq = torch.tensor(sequences, dtype=torch.long)
    tokens, labels = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
    b, length = tokens.shape
    return {"tokens": tokens, "labels": labels, "loss_mask": torch.ones(b, length),
            "position_ids": torch.arange(length).expand(b, length).contiguous(),
            "attention_mask": torch.triu(torch.ones(length, length, dtype=torch.bool), 1).expand(
                b, 1, length, length).contiguous()}


def eval_loss(model, micro_batches, forward_step=None):
    """The "lm loss" Megatron-LM's `evaluate` reports for `micro_batches`: its forward-only schedule (rerun state
    machine off, as `evaluate` sets it) with `forward_step` (ours by default), sum of losses / sum of tokens."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.rerun_state_machine import RerunMode, get_rerun_state_machine

    from megatron_tst.loop import forward

    machine = get_rerun_state_machine()
    mode = machine.get_mode()
    machine.set_mode(RerunMode.DISABLED)
    for chunk in model:
        chunk.eval()
    try:
        with torch.no_grad():
            losses = get_forward_backward_func()(
                forward_step_func=forward_step or forward.forward_step, data_iterator=iter(micro_batches),
                model=model, num_microbatches=len(micro_batches), seq_length=micro_batches[0]["tokens"].shape[1],
                micro_batch_size=micro_batches[0]["tokens"].shape[0], forward_only=True)
    finally:
        machine.set_mode(mode)
        for chunk in model:
            chunk.train()
    if not losses:  # not the last pipeline stage
        return None
    total = torch.stack([loss["lm loss"].view(-1) for loss in losses]).sum(dim=0)
    return float(total[0] / total[1])


def train_one_step(model, optimizer, scheduler, micro_batches):
    """One `megatron.training.training.train_step` (bound by keyword) with our `forward_step`, set up as
    Megatron-LM's `train` sets it up (grad scaling, finalize_model_grads, the rerun state machine's iteration).
    Returns (reduced losses {name: float}, grad norm, skipped)."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.rerun_state_machine import RerunDataIterator, get_rerun_state_machine
    from megatron.core.utils import get_model_config
    from megatron.training import get_args, get_timers, training

    from megatron_tst.loop.forward import forward_step

    args = get_args()
    config = get_model_config(model[0])
    config.grad_scale_func = optimizer.scale_loss
    config.timers = get_timers()
    config.finalize_model_grads_func = finalize_model_grads
    get_rerun_state_machine().current_iteration = args.iteration
    for chunk in model:
        chunk.train()
    out = training.train_step(forward_step_func=forward_step, data_iterator=RerunDataIterator(iter(micro_batches)),
                              model=model, optimizer=optimizer, opt_param_scheduler=scheduler, config=config,
                              forward_backward_func=get_forward_backward_func(), iteration=args.iteration)
    losses, skipped, grad_norm = out[0], out[1], out[5]
    return {key: float(value) for key, value in losses.items()}, float(grad_norm), int(skipped)


# ------------------------------------------------------------------------------------------------- the worker


def _state():
    from megatron.training import get_args

    args = get_args()
    return {"iteration": args.iteration, "consumed_train_samples": args.consumed_train_samples,
            "flops": args.num_floating_point_operations_so_far}


def _continue_in_process(record, argv):
    """Load through Megatron-LM's set-up with our providers; the fixed-batch eval loss, the next step, eval again."""
    initialize(argv)
    model, optimizer, scheduler = setup()
    out = {"state": _state(), "eval": eval_loss(model, [stock_micro_batch(record["eval_batch"]["sequences"])])}
    batches = [stock_micro_batch(s) for s in record["continuation_reference"]["micro_batch_sequences"]]
    out["losses"], out["grad_norm"], out["skipped"] = train_one_step(model, optimizer, scheduler, batches)
    out["eval_after"] = eval_loss(model, [stock_micro_batch(record["eval_batch"]["sequences"])])
    out["lr_after"] = [group["lr"] for group in optimizer.param_groups]
    return out


def _capturing(run, argv):
    """(exit status, stderr text) of `run_pretrain(argv)` in this process."""
    import contextlib
    import io

    stream = io.StringIO()
    with contextlib.redirect_stderr(stream):
        status = run(argv)
    return status, stream.getvalue()


def fixtures_worker(directory):
    from megatron_tst.platform.mcore_compat import read_common_state
    from megatron_tst.testing.megatron_lm import run_pretrain, teardown

    results = {}
    for name in FIXTURES:
        record, load = load_record(name), ["--load", os.path.join(ROOT, name)]
        save = os.path.join(directory, name)
        out = results[name] = {}
        out["plain"] = _continue_in_process(record, fixture_argv(record, save) + load)
        out["tst"] = _continue_in_process(record, fixture_argv(record, save) + load + TST_SEGMENTS)
        teardown()
        wrong = "1024" if NULL_TOKENIZER_ADDS_EOD else "1023"
        out["wrong_vocab"] = _capturing(run_pretrain, fixture_argv(record, save, vocab=wrong) + load)
        metrics = os.path.join(directory, f"{name}.jsonl")
        out["entry"] = run_pretrain(fixture_argv(record, save) + load + [
            "--exit-interval", "32", "--log-interval", "1", "--metrics-jsonl", metrics])
        saved = read_common_state(os.path.join(save, "iter_0000032"))
        out["saved"] = {"iteration": saved["iteration"], "flops": saved["num_floating_point_operations_so_far"],
                        "consumed_train_samples": saved["args"].consumed_train_samples,
                        "scheduler_steps": saved["opt_param_scheduler"]["num_steps"]}
    # TST from Megatron-LM's weights: superposition steps need the data stream from its start (--finetune: the
    # weights, a new iteration count); with the checkpoint's iteration the phase plan is refused.
    record = load_record("megatron_lm_gpt_tp1")
    sup = fixture_argv(record, os.path.join(directory, "tst")) + [
        "--tst-bag-size", "4", "--tst-superposition-iters", "2", "--exit-interval", "3", "--log-interval", "1"]
    fixture_dir = os.path.join(ROOT, "megatron_lm_gpt_tp1")
    results["sup_refused"] = _capturing(run_pretrain, sup + ["--load", fixture_dir])
    results["sup_segments_refused"] = _capturing(run_pretrain, sup + ["--load", fixture_dir,
                                                                      "--tst-sample-layout", "segments"])
    results["sup_finetune"] = run_pretrain(sup + ["--load", fixture_dir, "--finetune",
                                                  "--metrics-jsonl", os.path.join(directory, "finetune.jsonl")])
    results["sup_scratch"] = run_pretrain(sup + ["--save", os.path.join(directory, "scratch"),
                                                 "--metrics-jsonl", os.path.join(directory, "scratch.jsonl")])
    return results


@pytest.fixture(scope="module")
def continued(tmp_path_factory):
    directory = tmp_path_factory.mktemp("megatron_lm_fixtures")
    results = run_in_workers(fixtures_worker, 1, args=(str(directory),))[0]
    return directory, results


# ------------------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("name", FIXTURES)
def test_iteration_consumed_samples_and_flops_are_restored(continued, name):
    record = load_record(name)
    for way in ("plain", "tst"):
        assert continued[1][name][way]["state"] == {
            "iteration": 30, "consumed_train_samples": 120, "flops": record["num_floating_point_operations_so_far"]}


@pytest.mark.parametrize("name", FIXTURES)
def test_fixed_batch_eval_loss_equals_megatron_lm_bitwise(continued, name):
    record = load_record(name)
    assert continued[1][name]["plain"]["eval"] == record["eval_loss_at_save"]


@pytest.mark.parametrize("name", FIXTURES)
def test_megatron_lm_train_step_with_our_forward_step_reproduces_its_next_step_bitwise(continued, name):
    """Megatron-LM's `train_step` + our `forward_step` on the recorded micro-batches: Megatron-LM's loss, grad norm
    and the eval loss after the step, bitwise (the fixtures' writer ran the same float32 CPU kernels of torch
    2.13; MoE: the alltoall dispatcher with the aux loss, whose gradient is inside the grad norm)."""
    record = load_record(name)
    reference, ours = record["continuation_reference"], continued[1][name]["plain"]
    assert ours["losses"] == {"lm loss": reference["train_loss"]["lm loss"]}
    assert ours["grad_norm"] == reference["grad_norm"] and ours["skipped"] == 0
    assert ours["eval_after"] == reference["eval_loss_after"]


@pytest.mark.parametrize("name", FIXTURES)
def test_with_tst_flags_our_tst_model_continues_the_checkpoint_identically(continued, name):
    """`--tst-*` added to the fixture's command line (the segments layout continues Megatron's stock samples; no
    superposition step is left before the checkpoint's iteration): our TSTGPTModel loads Megatron-LM's
    checkpoint and continues exactly as the plain run."""
    plain, tst = continued[1][name]["plain"], continued[1][name]["tst"]
    assert tst == plain


@pytest.mark.parametrize("name", FIXTURES)
def test_the_entry_point_continues_at_the_checkpoints_iteration_schedule_and_flops(continued, name):
    """`megatron_tst.pretrain` with the fixture's command line (+ --load, --exit-interval 32): iterations 31 and 32
    on the checkpoint's cosine / WSD schedule, saved with the checkpoint's FLOPs count plus these steps'. (The
    first iteration line of a process ends no interval: the record is iteration 32's.)"""
    directory, results = continued
    record = load_record(name)
    assert results[name]["entry"] == 0
    (train,) = read_jsonl(directory / f"{name}.jsonl", "train")
    assert (train["iteration"], train["megatron_samples"], train["phase"]) == (32, 128, "recovery")
    # Megatron-LM's schedule (float64, independent of its code): warm-up 5 x 4 samples, decay over 100 x 4
    state = record["opt_param_scheduler_state"]
    steps, warmup, decay = 128, state["lr_warmup_steps"], state["lr_decay_steps"]
    if state["lr_decay_style"] == "cosine":
        expected = state["min_lr"] + (state["max_lr"] - state["min_lr"]) * 0.5 * (
            math.cos(math.pi * (steps - warmup) / (decay - warmup)) + 1.0)
    else:  # WSD before its decay phase (the last --lr-wsd-decay-iters 10 x 4 samples): the peak LR
        assert state["lr_decay_style"] == "WSD" and steps < decay - 40
        expected = state["max_lr"]
    assert train["lr"] == pytest.approx(expected, rel=1e-12)
    per_step = record["num_floating_point_operations_so_far"] / 30  # every step of the fixture: 4 samples of 64
    assert results[name]["saved"] == {"iteration": 32, "consumed_train_samples": 128, "scheduler_steps": 128,
                                      "flops": record["num_floating_point_operations_so_far"] + 2 * per_step}
    assert math.isfinite(train["loss"])


@pytest.mark.parametrize("name", FIXTURES)
def test_another_null_tokenizer_vocabulary_is_refused_naming_the_flag_that_fits(continued, name):
    """The --vocab-size that gives this release's NullTokenizer other ids than the checkpoint's: refused before the
    model is built (exit 2, once), naming the value that fits. Megatron-LM's loader would load the 1024-row
    embedding into the larger padded one and keep the extra rows' initial values: another loss, silently."""
    status, stderr = continued[1][name]["wrong_vocab"]
    wrong = "1024" if NULL_TOKENIZER_ADDS_EOD else "1023"
    assert status == 2
    assert f"--vocab-size: checkpoint 1024 (1024 token ids, end-of-document 1023), this run {wrong} (" in stderr
    assert f"--vocab-size {VOCAB_FLAG} gives this megatron-core's NullTokenizer the checkpoint's vocabulary" in stderr
    assert stderr.count("error:") == 1 and "Traceback" not in stderr


def test_superposition_steps_from_megatron_lm_weights(continued):
    """TST from Megatron-LM's checkpoint: with its iteration (30) and consumed samples (120 stock samples) a run
    with superposition steps is refused before the model is built: windows of 4 x 64 tokens are another stream
    (naming --tst-sample-layout segments and --finetune), and with the segments layout the phase plan would put
    superposition steps before iteration 30 (naming it). With --finetune the run starts at iteration 0 on the
    checkpoint's weights and trains 2 superposition steps, then recovery; its losses are not a fresh
    initialisation's."""
    directory, results = continued
    status, stderr = results["sup_refused"]
    assert status == 2 and stderr.count("error:") == 1, stderr[-2000:]
    assert "consumed 120 samples of Megatron's stock samples" in stderr and "--finetune" in stderr
    assert "Add --tst-sample-layout segments to continue that stream exactly" in stderr
    status, stderr = results["sup_segments_refused"]
    assert status == 2 and stderr.count("error:") == 1, stderr[-2000:]
    assert "the superposition phase (--tst-superposition-ratio/--tst-superposition-iters): checkpoint 0 steps, " \
           "this run 2" in stderr and "--finetune" in stderr
    assert results["sup_finetune"] == results["sup_scratch"] == 0
    finetuned = read_jsonl(directory / "finetune.jsonl", "train")
    scratch = read_jsonl(directory / "scratch.jsonl", "train")
    assert [(r["iteration"], r["phase"], r["loss_name"]) for r in finetuned] == [  # a process's first line: none
        (2, "superposition", "mce loss"), (3, "recovery", "lm loss")]
    assert all(math.isfinite(r["loss"]) for r in finetuned)
    assert [r["loss"] for r in finetuned] != [r["loss"] for r in scratch]
