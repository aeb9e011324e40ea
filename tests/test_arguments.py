"""The command line of `python -m megatron_tst.pretrain`: Megatron-LM's flags unchanged (Megatron-LM's own parser is
the reference), TST's flags, --recipe / --config, TST's refusals and bad TST values refused before heavy work.

"Our entry's parsing" is what the trainer does before it builds anything: `megatron_tst.pretrain.prepare(argv)`
(--recipe/--config expansion, Megatron-LM bends), Megatron-LM's `parse_args` with `loop.arguments.add_arguments`,
`validate_args` with `pretrain_gpt.py`'s defaults; then `start_run`'s TST checks (`loop.arguments.check_arguments`,
`loop.run.start`) with Megatron-LM's globals (`set_global_variables`) set as its initialisation sets them.
"""

from __future__ import annotations

import contextlib
import functools
import io
import sys

import pytest
from cli import tiny_args
from test_real_configs import (
    TST_FLAGS,
    launch_environment,
    load_real_config,
    megatron_lm_verdict,
    real_config_names,
)

pytestmark = pytest.mark.unit

TINY = tiny_args(bag_size=None)  # a Megatron-LM command line without --tst-* flags
TST_ONLY = ("tst_bag_size", "tst_superposition_ratio", "tst_superposition_iters", "tst_weighting", "tst_sample_layout",
            "metrics_jsonl", "record_data_stream", "recipe", "config")


def cpu_stand_ins():
    """megatron_tst.platform.cpu (its stand-ins for validating GPU command lines on this CPU machine)."""
    from megatron_tst.platform import cpu

    return cpu


def _megatron_parse_args():
    from megatron_tst.platform import megatron_lm

    megatron_lm.prepare_import()
    from megatron.training import arguments

    return arguments


def entry_parse(argv, world_size: int = 1, env=None):
    """Our entry's parse of `argv` (not validated): prepare + Megatron-LM's parser with TST's provider. Raises
    SystemExit (argparse) with the message on stderr."""
    from megatron_tst import pretrain
    from megatron_tst.loop import arguments as tst_arguments

    arguments = _megatron_parse_args()
    with launch_environment(world_size, env or {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}):
        saved = sys.argv
        pretrain.prepare(list(argv))
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                return arguments.parse_args(extra_args_provider=tst_arguments.add_arguments)
        finally:
            sys.argv = saved


def entry_args(argv, world_size: int = 1, env=None):
    """Our entry's parsed and validated arguments (Megatron-LM's `validate_args`, `pretrain_gpt.py`'s defaults)."""
    from megatron_tst import pretrain

    arguments = _megatron_parse_args()
    args = entry_parse(argv, world_size, env)
    with launch_environment(world_size, env or {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}), \
            cpu_stand_ins().device_capability_stand_in(), contextlib.redirect_stdout(io.StringIO()):
        arguments.validate_args(args, dict(pretrain.ARGS_DEFAULTS))
    return args


def megatron_parse(argv, world_size: int = 1, env=None):
    """Megatron-LM's own parse of `argv` (its parser alone, no extra provider, no expansion)."""
    arguments = _megatron_parse_args()
    parse_args = getattr(arguments.parse_args, "__wrapped_by_megatron_tst__", arguments.parse_args)
    with launch_environment(world_size, env or {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}, argv), \
            contextlib.redirect_stdout(io.StringIO()):
        return parse_args()


@contextlib.contextmanager
def megatron_globals(args):
    """Megatron-LM's globals for `args` as its initialisation sets them (the num-microbatches calculator), then
    unset."""
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
    from megatron.training import global_vars

    with contextlib.redirect_stdout(io.StringIO()):
        global_vars.set_global_variables(args, build_tokenizer=False)
    try:
        yield
    finally:
        global_vars.unset_global_variables()
        destroy_num_microbatches_calculator()


def tst_start(argv, world_size: int = 1):
    """`start_run`'s TST checks on our entry's arguments: the refusals and layout (check_arguments) and the run's
    sample plan (loop.run.start). Returns the TSTRun; raises ValueError with TST's reason."""
    from megatron_tst.loop import arguments as tst_arguments
    from megatron_tst.loop import run as tst_run

    args = entry_args(argv, world_size)
    with megatron_globals(args):
        tst_arguments.check_arguments(args)
        return tst_run.start(args)


def assert_same_megatron_namespace(ours, reference, given):
    """Every Megatron-LM attribute of `reference` has its value in `ours`, except the CPU defaults of flags the
    command line does not give (platform.cpu.CPU_ARGUMENT_DEFAULTS, on machines without CUDA)."""
    from megatron_tst.platform import cpu

    cpu_defaults = cpu.CPU_ARGUMENT_DEFAULTS if not cpu.cuda_available() else {}
    ours, reference = vars(ours), vars(reference)
    differ = []
    for key, value in reference.items():
        if key in cpu_defaults and not given(key):
            assert ours[key] == cpu_defaults[key], key
        elif ours.get(key, "<missing>") != value:
            differ.append(f"{key}: ours {ours.get(key, '<missing>')!r}, Megatron-LM's {value!r}")
    assert not differ, differ
    assert set(ours) - set(reference) <= set(TST_ONLY), set(ours) - set(reference)


def _flag_given(argv):
    """Whether `argv` gives a flag of the argparse dest."""
    actions = _megatron_actions()
    dests = {actions[token.split("=")[0]].dest for token in argv if token.split("=")[0] in actions}
    return lambda dest: dest in dests


@functools.lru_cache(maxsize=None)
def _megatron_actions():
    """{option string: argparse action} of this release's Megatron-LM parser."""
    import argparse

    arguments = _megatron_parse_args()
    return arguments.add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))._option_string_actions


# ------------------------------------------------------------------------------------- Megatron-LM's flags unchanged


@pytest.mark.parametrize("name", real_config_names())
def test_real_megatron_lm_command_lines_parse_to_megatron_lms_namespace(name):
    """Others' Megatron-LM command lines (tests/fixtures/real_configs) + TST's flags: our entry's parse has
    Megatron-LM's own value for every Megatron-LM flag, and the same verdict of its validation."""
    config = load_real_config(name)
    try:
        reference = megatron_parse(config.argv, config.world_size, config.env)
    except SystemExit:  # Megatron-LM's parser refuses it (an unknown flag): so does ours
        with pytest.raises(SystemExit):
            entry_parse(config.argv + TST_FLAGS, config.world_size, config.env)
        return
    ours = entry_parse(config.argv + TST_FLAGS, config.world_size, config.env)
    assert_same_megatron_namespace(ours, reference, _flag_given(config.argv))
    assert (ours.tst_bag_size, ours.tst_superposition_ratio) == (4, 0.3)
    verdict = megatron_lm_verdict(config.argv, config.world_size, config.env)
    if verdict is None:
        entry_args(config.argv + TST_FLAGS, config.world_size, config.env)  # validates as Megatron-LM's does


def test_a_tiny_llama_command_line_parses_to_megatron_lms_namespace():
    ours = entry_parse(TINY)
    assert_same_megatron_namespace(ours, megatron_parse(TINY), _flag_given(TINY))
    assert all(getattr(ours, key) is None for key in TST_ONLY)
    run = tst_start(TINY)
    assert run.tst is None and not run.plan.tst  # no --tst-* flags: a plain Megatron-LM run


def test_a_megatron_flag_on_the_command_line_beats_the_cpu_defaults():
    from megatron_tst.platform import cpu

    if cpu.cuda_available():
        pytest.skip("the CPU defaults apply only without CUDA")
    args = entry_parse(TINY + ["--transformer-impl", "transformer_engine", "--distributed-backend", "nccl"])
    assert (args.transformer_impl, args.distributed_backend) == ("transformer_engine", "nccl")
    assert entry_parse(TINY).transformer_impl == "local"


def test_an_unknown_flag_is_refused_as_megatron_lm_refuses_it(capsys):
    with pytest.raises(SystemExit):
        entry_parse(TINY + ["--not-a-megatron-flag", "1"])
    assert "unrecognized arguments: --not-a-megatron-flag" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- TST's flags


def test_tst_flags_give_the_run_its_phases():
    run = tst_start(TINY + ["--tst-bag-size", "4", "--tst-superposition-ratio", "0.5", "--tst-weighting", "power"])
    assert (run.tst.bag_size, run.tst.weighting, run.tst.sample_layout) == (4, "power", "contiguous")
    assert run.plan.superposition_steps == 3 and run.plan.superposition_samples == 3 * 8  # 6 iters, batch 8
    iters = tst_start(TINY + ["--tst-bag-size", "6", "--tst-superposition-iters", "2"])
    assert iters.plan.superposition_steps == 2 and iters.tst.bag_size == 6  # any L with the contiguous layout


def test_sample_based_schedule_counts_superposition_steps_from_train_samples():
    argv = list(TINY) + ["--tst-bag-size", "4", "--tst-superposition-ratio", "0.25"]
    for flag in ("--train-iters", "--lr-warmup-iters"):  # flags with one value
        i = argv.index(flag)
        del argv[i:i + 2]
    run = tst_start(argv + ["--train-samples", "80", "--lr-decay-samples", "80", "--lr-warmup-samples", "8"])
    assert run.plan.total_samples == 80 and run.plan.superposition_steps == 2  # floor(0.25 * 80 / 8)


def test_a_batch_size_ramp_up_gives_the_superposition_steps_their_samples():
    """Megatron's own batch schedule (0.17: --rampup-batch-size 4 4 16; 0.19: --step-batch-size-schedule, thresholds
    in tokens): batch 4 for the first 16 samples, then 8. 80 samples = 4 steps of 4 + 8 steps of 8 = 12 steps;
    r = 0.5: 6 superposition steps = 4 x 4 + 2 x 8 = 32 samples."""
    argv = list(TINY) + ["--tst-bag-size", "4", "--tst-superposition-ratio", "0.5"]
    for flag in ("--train-iters", "--lr-warmup-iters", "--global-batch-size"):
        i = argv.index(flag)
        del argv[i:i + 2]
    argv += ["--train-samples", "80", "--lr-decay-samples", "80", "--lr-warmup-samples", "8"]
    if "--step-batch-size-schedule" in _megatron_actions():
        argv += ["--step-batch-size-schedule", f"0:4 {16 * 32}:8"]
    else:
        argv += ["--global-batch-size", "8", "--rampup-batch-size", "4", "4", "16"]
    run = tst_start(argv)
    assert (run.plan.superposition_steps, run.plan.superposition_samples, run.plan.total_samples) == (6, 32, 80)


@pytest.mark.parametrize("extra, message", [
    (["--tst-bag-size", "0", "--tst-superposition-ratio", "0.3"], "--tst-bag-size must be an integer >= 1, got 0"),
    (["--tst-bag-size", "4", "--tst-superposition-ratio", "1.0"], "--tst-superposition-ratio must be in [0, 1)"),
    (["--tst-bag-size", "4", "--tst-superposition-ratio", "-0.1"], "--tst-superposition-ratio must be in [0, 1)"),
    (["--tst-bag-size", "4", "--tst-superposition-iters", "6"], "6 superposition steps leave no recovery phase"),
    (["--tst-bag-size", "4", "--tst-superposition-iters", "-1"], "--tst-superposition-iters must be >= 0"),
    (["--tst-bag-size", "4", "--tst-superposition-ratio", "0.3", "--tst-superposition-iters", "2"],
     "give --tst-superposition-ratio or --tst-superposition-iters, not both"),
    (["--tst-superposition-ratio", "0.3"], "--tst-superposition-ratio needs --tst-bag-size"),
    (["--tst-bag-size", "4"], "TST needs --tst-superposition-ratio or --tst-superposition-iters"),
    (["--tst-weighting", "power"], "--tst-weighting needs --tst-bag-size and --tst-superposition-ratio"),
    (["--tst-bag-size", "5", "--tst-superposition-ratio", "0.3", "--tst-sample-layout", "segments"],
     "--seq-length 32 must be divisible by --tst-bag-size 5 with --tst-sample-layout segments"),
])
def test_bad_tst_values_are_clear_errors_before_heavy_work(extra, message):
    with pytest.raises(ValueError) as err:
        tst_start(TINY + extra)
    assert message in str(err.value)


@pytest.mark.parametrize("extra, message", [
    (["--tst-weighting", "cubic"], "argument --tst-weighting: invalid choice: 'cubic'"),
    (["--tst-sample-layout", "windows"], "argument --tst-sample-layout: invalid choice: 'windows'"),
    (["--tst-bag-size", "four"], "argument --tst-bag-size: invalid int value: 'four'"),
])
def test_bad_tst_flag_values_are_refused_by_the_parser(capsys, extra, message):
    with pytest.raises(SystemExit):
        entry_parse(TINY + extra)
    assert message in capsys.readouterr().err


def test_bags_may_not_straddle_sequence_parallel_slices():
    argv = tiny_args(seq_length=30, bag_size=None) + ["--tensor-model-parallel-size", "4", "--sequence-parallel",
                                                      "--tst-bag-size", "4", "--tst-superposition-ratio", "0.3"]
    with pytest.raises(ValueError, match="sequence parallelism splits the 30 superposed positions over TP=4"):
        tst_start(argv, world_size=4)


# ------------------------------------------------------------------------------------------------- TST's refusals

# The command-line extras that trigger each refusal of megatron_tst.loop.arguments (keyed by its `what`, without a
# {value} part), each accepted by Megatron-LM's own validation: TST refuses them, not Megatron-LM.
REFUSAL_CASES = {
    "--dataloader-type": ["--dataloader-type", "cyclic"],
    "--reset-position-ids / --reset-attention-mask": ["--reset-position-ids"],
    "--fim-data": ["--fim-data", "--data-path", "/PLACEHOLDER/corpus_text_document"],
    "--phase-transition-iterations": ["--phase-transition-iterations", "3"],
    "--overlap-moe-expert-parallel-comm": ["--num-experts", "4", "--moe-router-topk", "2",
                                           "--moe-token-dispatcher-type", "alltoall", "--expert-model-parallel-size",
                                           "2", "--bf16", "--overlap-moe-expert-parallel-comm"],
    "--position-embedding-type mrope": ["--position-embedding-type", "mrope", "--mrope-section", "4", "2", "2"],
    "--sft": ["--sft"],
    "--hybrid-context-parallel / --dataloader-inter-document-masking": ["--hybrid-context-parallel",
                                                                        "--calculate-per-token-loss"],
    "--logits-load-dir": ["--logits-load-dir", "/PLACEHOLDER/logits"],
    "--mtp-num-layers": ["--mtp-num-layers", "1"],
    "--use-legacy-models": ["--use-legacy-models", "--ckpt-format", "torch"],
}


def _refusals():
    from megatron_tst.loop import arguments

    return ([(what, why, "entry") for _, what, why in arguments.ENTRY_REFUSALS]
            + [(what, why, "tst") for _, what, why in arguments.TST_REFUSALS])


def test_every_refusal_has_a_case():
    assert {what.split(" {")[0] for what, _, _ in _refusals()} == set(REFUSAL_CASES)


@pytest.mark.parametrize("what, why, kind", _refusals(), ids=[w.split(" {")[0] for w, _, _ in _refusals()])
def test_each_refusal_says_what_and_why_before_heavy_work(what, why, kind):
    key = what.split(" {")[0]
    extra = REFUSAL_CASES[key]
    flags = _megatron_actions()
    if any(token.startswith("--") and token not in flags for token in extra):
        pytest.skip(f"this Megatron-LM release has no {key}")
    world_size = 2 if "--expert-model-parallel-size" in extra else 1
    argv = [a for a in TINY if not (a == "--mock-data" and "--data-path" in extra)] + extra
    assert megatron_lm_verdict(argv, world_size, {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}) is None  # Megatron-LM accepts
    shown = what.format(dataloader_type="cyclic")
    with pytest.raises(ValueError) as err:
        tst_start(argv + TST_FLAGS, world_size)
    assert str(err.value).startswith("megatron-tst cannot run this command line:")
    assert f"{shown}: {why}" in str(err.value)
    if kind == "entry":  # refused in every run of this entry point, with or without --tst-* flags
        with pytest.raises(ValueError, match="megatron-tst cannot run"):
            tst_start(argv, world_size)
    else:  # without --tst-* flags the run is a plain Megatron-LM run: not refused
        assert tst_start(argv, world_size).tst is None


# ---------------------------------------------------------------------------------------------- --recipe, --config


def test_recipe_config_and_command_line_precedence(tmp_path):
    from megatron_tst import recipes

    config = tmp_path / "run.yaml"
    config.write_text("lr: 5.0e-4\nseq-length: 1008\nmax_position_embeddings: 1008\nuse_distributed_optimizer: false\n"
                      "tensorboard-dir: null\nmoe-layer-freq: 1\ntst-weighting: power\n"
                      "recompute-modules: [core_attn, mlp]\nlog-throughput: true\n")
    tail = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "128256", "--mock-data"]
    args = entry_args(["--recipe", "270m", "--config", str(config), "--lr", "1e-3"] + tail, world_size=8)
    recipe = recipes.get("270m").settings
    assert args.lr == 1e-3  # command line > config > recipe
    assert (args.seq_length, args.max_position_embeddings, args.tst_weighting) == (1008, 1008, "power")  # config
    assert args.recompute_modules == ["core_attn", "mlp"] and args.log_throughput  # a YAML list: nargs; true: switch
    assert args.hidden_size == recipe["hidden-size"] and args.min_lr == recipe["min-lr"]  # the recipe's
    assert args.use_distributed_optimizer  # a switch the recipe gives: false in the config cannot undo it
    assert (args.recipe, args.config) == ("270m", str(config))  # kept: Megatron-LM records them in checkpoints
    shorter = entry_args(["--recipe", "270m", "--train-iters", "3000"] + tail, world_size=8)
    assert shorter.lr_wsd_decay_iters == 300  # the recipe's WSD decay stays 10 % of a changed --train-iters
    assert entry_args(["--recipe", "270m", "--train-iters", "3000", "--lr-wsd-decay-iters", "50"] + tail,
                      world_size=8).lr_wsd_decay_iters == 50
    iters = entry_args(["--recipe", "270m", "--tst-superposition-iters=100"] + tail, world_size=8)
    assert (iters.tst_superposition_iters, iters.tst_superposition_ratio) == (100, None)  # replaces the ratio


def test_bad_recipe_or_config_names_the_flag(tmp_path):
    with pytest.raises(SystemExit, match="--recipe: unknown recipe '7b': known recipes are 270m, 600m, 3b, 10b-a1b"):
        entry_parse(TINY + ["--recipe", "7b"])
    with pytest.raises(SystemExit, match="--config: no such file"):
        entry_parse(TINY + ["--config", str(tmp_path / "missing.yaml")])
    listing = tmp_path / "list.yaml"
    listing.write_text("- lr\n- 1e-3\n")
    with pytest.raises(SystemExit, match="expected a mapping of flag names to values"):
        entry_parse(TINY + ["--config", str(listing)])


# --------------------------------------------------------------------------------------- the fused output layer + loss


def test_linear_cross_entropy_fusion_is_accepted_and_switches_the_fused_loss_on(capsys):
    from megatron.training.arguments import core_transformer_config_from_args

    from megatron_tst.model import linear_loss_fusion_enabled

    with pytest.raises(SystemExit):  # Megatron-LM 0.17 / 0.19's own parser has no 'linear'
        megatron_parse(TINY + ["--cross-entropy-fusion-impl", "linear"])
    assert "invalid choice: 'linear'" in capsys.readouterr().err
    cases = {"": False, "--cross-entropy-loss-fusion": False,
             "--cross-entropy-fusion-impl linear": False,
             "--cross-entropy-loss-fusion --cross-entropy-fusion-impl linear": True}
    for extra, fused in cases.items():
        args = entry_args(TINY + extra.split())
        with contextlib.redirect_stdout(io.StringIO()):
            config = core_transformer_config_from_args(args)
        assert linear_loss_fusion_enabled(config) == fused, extra
    assert entry_args(TINY + ["--cross-entropy-fusion-impl", "linear"]).cross_entropy_fusion_impl == "linear"

