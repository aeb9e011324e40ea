"""The command line: Megatron-LM's flags unchanged, TST flags, YAML form, and bad input refused early."""

import os
import subprocess
import sys

import pytest
from text_corpus import VOCAB_SIZE, build_byte_corpus

from megatron_tst.training import arguments, configs
from megatron_tst.training.arguments import parse_args
from megatron_tst.training.data import validate_data_files

SMALL = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --micro-batch-size 2 "
         "--train-iters 10 --lr 1e-3 --tokenizer-type NullTokenizer --vocab-size 257 --mock-data").split()


def _fixture_argv(name):
    from run_harness import fixture, fixture_argv

    return fixture_argv(fixture(name)[0], "/tmp/x")


@pytest.mark.unit
@pytest.mark.parametrize("name", ["megatron_lm_gpt_tp1", "megatron_lm_moe_tp1"])
def test_megatron_lm_command_lines_parse_unchanged(name):
    args = parse_args(_fixture_argv(name) + ["--mock-data"], world_size=1)
    assert (args.num_layers, args.hidden_size, args.num_query_groups, args.ffn_hidden_size) == (2, 64, 2, 128)
    assert args.swiglu and args.untie_embeddings_and_output_weights and not args.tst
    assert args.lr_warmup_iters == 5 and args.save == "/tmp/x" and args.global_batch_size == 4
    assert "--distributed-backend" in args.ignored_flags and "--no-masked-softmax-fusion" in args.ignored_flags
    assert "--transformer-impl" in args.ignored_flags
    if "moe" in name:
        assert (args.num_experts, args.moe_router_topk, args.lr_decay_style) == (4, 2, "WSD")


@pytest.mark.unit
def test_ignored_flag_values_are_not_misread():
    # --transformer-impl takes a value: "local" must not become a positional or another flag's value
    args = parse_args(SMALL + ["--transformer-impl", "local", "--timing-log-level", "2"], world_size=1)
    assert args.ignored_flags == ["--timing-log-level", "--transformer-impl"]


@pytest.mark.unit
def test_megatron_flags_that_would_change_training_are_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(SMALL + ["--fp8-format", "hybrid"], world_size=1)
    assert "not supported by megatron-tst: --fp8-format" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(SMALL + ["--not-a-megatron-flag"], world_size=1)


@pytest.mark.unit
def test_tst_flags_and_yaml_config(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("tst-bag-size: 4\ntst_superposition_ratio: 0.3\nlr: 5.0e-4\nswiglu: true\n")
    args = parse_args(SMALL + ["--config", str(config), "--lr", "2e-3"], world_size=1)
    assert args.tst.bag_size == 4 and args.tst_superposition_steps == 3 and args.swiglu
    assert args.lr == 2e-3  # the command line wins over the file
    assert parse_args(SMALL, world_size=1).tst is None  # no --tst-*: a plain baseline
    assert args.tst.sample_layout == "contiguous"  # the paper's rows by default


@pytest.mark.unit
@pytest.mark.parametrize("bag_size", [5, 6])
def test_any_sequence_length_with_the_contiguous_layout(bag_size):
    # --seq-length 64 with bags of 5 or 6 (64 % s != 0): a row is 64*s contiguous tokens, 64 bags of s
    args = parse_args(SMALL + ["--tst-bag-size", str(bag_size), "--tst-superposition-ratio", "0.3"], world_size=1)
    assert (args.seq_length, args.tst.bag_size, args.tst.sample_layout) == (64, bag_size, "contiguous")


@pytest.mark.unit
@pytest.mark.parametrize("extra,world_size,message", [
    (["--global-batch-size", "6", "--micro-batch-size", "2"], 2,
     "not divisible by --micro-batch-size 2 x data-parallel size 2"),
    (["--tst-bag-size", "4", "--tst-superposition-ratio", "1.0"], 1, "must be in [0, 1)"),
    (["--tst-bag-size", "4", "--tst-superposition-ratio", "-0.1"], 1, "must be in [0, 1)"),
    (["--tst-bag-size", "5", "--tst-superposition-ratio", "0.3", "--tst-sample-layout", "segments"], 1,
     "divisible by --tst-bag-size 5 with --tst-sample-layout segments"),
    (["--tst-sample-layout", "segments"], 1, "--tst-sample-layout needs --tst-bag-size"),
    (["--tst-bag-size", "4", "--tst-superposition-ratio", "0.3", "--tst-sample-layout", "windows"], 1,
     "invalid choice: 'windows'"),
    (["--tst-bag-size", "0", "--tst-superposition-ratio", "0.3"], 1, "must be an integer >= 1"),
    (["--tst-superposition-ratio", "0.3"], 1, "needs --tst-bag-size"),
    (["--tensor-model-parallel-size", "2"], 3, "some processes would not be used"),
    (["--tensor-model-parallel-size", "3"], 3, "not divisible by TP=3"),
    (["--tst-bag-size", "4", "--tst-superposition-iters", "10"], 1, "leave no recovery phase"),
    (["--tensor-model-parallel-size", "4", "--sequence-parallel", "--seq-length", "66"], 4, "not divisible by TP=4"),
    (["--tensor-model-parallel-size", "2", "--num-experts", "4"], 2,
     "--num-experts with TP=2 needs --sequence-parallel"),
    (["--overlap-param-gather"], 2, "--overlap-param-gather needs --use-distributed-optimizer"),
])
def test_bad_arguments_are_clear_errors(capsys, extra, world_size, message):
    with pytest.raises(SystemExit):
        parse_args(SMALL + extra, world_size=world_size)
    err = capsys.readouterr().err
    assert message in err, err


@pytest.mark.unit
def test_data_checks(tmp_path):
    prefix = build_byte_corpus(str(tmp_path / "ok"))
    validate_data_files([prefix], VOCAB_SIZE)
    with pytest.raises(ValueError, match="outside the model's vocabulary of 200"):
        validate_data_files([prefix], 200)
    # a .bin cut short no longer matches its .idx
    broken = str(tmp_path / "broken")
    for suffix in (".idx", ".bin"):
        data = open(prefix + suffix, "rb").read()
        open(broken + suffix, "wb").write(data[:-10] if suffix == ".bin" else data)
    with pytest.raises(ValueError, match="do not belong together"):
        validate_data_files([broken], VOCAB_SIZE)
    with pytest.raises(SystemExit):
        parse_args(SMALL[:-1] + ["--data-path", str(tmp_path / "missing")], world_size=1)


@pytest.mark.e2e
def test_cli_refuses_bad_data_before_heavy_work(tmp_path):
    prefix = build_byte_corpus(str(tmp_path))
    argv = SMALL[:-1] + ["--data-path", prefix, "--vocab-size", "100"]
    result = subprocess.run([sys.executable, "-m", "megatron_tst.pretrain"] + argv, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode != 0
    assert "error:" in result.stderr and "outside the model's vocabulary of 100" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.unit
def test_mfu_peak_is_looked_up_by_the_most_specific_device_name():
    from megatron_tst.training.metrics import peak_tflops_of_device_name

    assert peak_tflops_of_device_name("NVIDIA GB200") == 2500.0  # not B200's 2250
    assert peak_tflops_of_device_name("NVIDIA B200") == 2250.0
    assert peak_tflops_of_device_name("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_of_device_name("Intel Xeon") is None


@pytest.mark.unit
def test_loss_fusion_flags_follow_megatron_lm():
    """`--cross-entropy-loss-fusion --cross-entropy-fusion-impl linear` switches the fused output layer + loss on
    (TransformerConfig fields, as Megatron-LM sets them); native/te and the impl alone are accepted and ignored."""
    from megatron_tst.model import linear_loss_fusion_enabled

    base = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --micro-batch-size 1 "
            "--train-iters 2 --lr 1e-3 --mock-data --tokenizer-type NullTokenizer --vocab-size 64").split()
    cases = {"": (False, []),
             "--cross-entropy-loss-fusion": (False, ["--cross-entropy-fusion-impl", "--cross-entropy-loss-fusion"]),
             "--cross-entropy-loss-fusion --cross-entropy-fusion-impl te":
                 (False, ["--cross-entropy-fusion-impl", "--cross-entropy-loss-fusion"]),
             "--cross-entropy-fusion-impl linear": (False, ["--cross-entropy-fusion-impl"]),
             "--cross-entropy-loss-fusion --cross-entropy-fusion-impl linear": (True, [])}
    for extra, (fused, ignored) in cases.items():
        args = arguments.parse_args(base + extra.split(), world_size=1)
        config = configs.transformer_config_from_args(args)
        assert arguments.linear_loss_fusion(args) == fused == linear_loss_fusion_enabled(config), extra
        assert [f for f in args.ignored_flags if "cross-entropy" in f] == ignored, extra
    with pytest.raises(SystemExit):
        arguments.parse_args(base + "--cross-entropy-loss-fusion --cross-entropy-fusion-impl cute".split())
