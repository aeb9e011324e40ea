"""Recipes (megatron_tst/recipes.py), parameter counts (megatron_tst/params.py) and the planner (tools/plan.py)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from megatron_tst import recipes
from megatron_tst.params import count_parameters, count_parameters_from_args
from megatron_tst.training import arguments, configs
from megatron_tst.training.tokenizer import vocab_size_with_padding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAN = os.path.join(ROOT, "tools", "plan.py")
NO_DATA = ["--mock-data", "--tokenizer-type", "NullTokenizer"]


def _plan_module():
    spec = importlib.util.spec_from_file_location("tst_plan_tool", PLAN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parse(argv, world_size=1):
    return arguments.parse_args(argv, world_size=world_size)


def _build(args):
    from megatron_tst.model import build_gpt_model

    padded = vocab_size_with_padding(args.vocab_size, args.make_vocab_size_divisible_by,
                                     args.tensor_model_parallel_size)
    config = configs.transformer_config_from_args(args)
    model = build_gpt_model(config, configs.model_options_from_args(args, padded), args.tst,
                            seq_length=args.seq_length)
    return model, padded


# ------------------------------------------------------------------------------------------------- recipes


@pytest.mark.unit
@pytest.mark.parametrize("name", recipes.names())
def test_every_recipe_parses_with_its_layout(name):
    recipe = recipes.get(name)
    args = _parse(["--recipe", name] + NO_DATA + ["--vocab-size", str(recipe.vocab_size)], world_size=8)
    s = recipe.settings
    assert args.num_layers == s["num-layers"] and args.hidden_size == s["hidden-size"]
    assert args.tst.bag_size == s["tst-bag-size"] and args.seq_length % args.tst.bag_size == 0
    assert args.lr_wsd_decay_iters == args.train_iters // 10 and args.lr_decay_style == "WSD"
    assert args.lr_warmup_iters == 2000 and (args.adam_beta1, args.adam_beta2) == (0.9, 0.95)
    assert args.bf16 and args.use_distributed_optimizer and args.untie_embeddings_and_output_weights
    assert args.swiglu and args.disable_bias_linear and args.normalization == "RMSNorm"
    assert args.hidden_dropout == 0.0 and args.attention_dropout == 0.0
    assert args.global_batch_size == 1024 and args.data_parallel_size == 8 // args.tensor_model_parallel_size
    assert args.ignored_flags == []


@pytest.mark.unit
def test_recipe_settings_match_the_paper():
    lrs = {"270m": 2e-3, "600m": 1e-3, "3b": 2e-4, "10b-a1b": 3e-4}
    for name, lr in lrs.items():
        s = recipes.get(name).settings
        assert s["lr"] == lr and s["min-lr"] == pytest.approx(lr / 10)
    for name in ("270m", "600m", "3b"):
        s = recipes.get(name).settings
        assert (s["tst-bag-size"], s["tst-superposition-ratio"], s["train-iters"]) == (6, 0.3, 20000)
        assert 2.0e6 <= s["seq-length"] * s["global-batch-size"] <= 2.2e6  # "about 2M tokens per step"
    moe = recipes.get("10b-a1b").settings
    assert (moe["tst-bag-size"], moe["tst-superposition-ratio"], moe["train-iters"]) == (16, 0.25, 49983)
    assert moe["seq-length"] * moe["global-batch-size"] == 8192 * 1024
    assert (moe["num-experts"], moe["moe-router-topk"], moe["moe-ffn-hidden-size"], moe["kv-channels"]) == \
        (128, 8, 512, 128)
    assert "moe-shared-expert-intermediate-size" not in moe and moe["qk-layernorm"] is True


@pytest.mark.unit
def test_command_line_overrides_the_recipe():
    args = _parse(["--recipe", "3b", "--lr", "1e-4", "--micro-batch-size", "1", "--tensor-model-parallel-size", "2",
                   "--tst-superposition-ratio", "0"] + NO_DATA + ["--vocab-size", "128256"], world_size=8)
    assert args.lr == 1e-4 and args.micro_batch_size == 1 and args.tst_superposition_steps == 0
    assert args.tensor_model_parallel_size == 2 and args.sequence_parallel  # recipe's SP applies at TP > 1
    for given in (["--tst-superposition-iters", "100"], ["--tst-superposition-iters=100"]):
        steps = _parse(["--recipe", "3b"] + given + NO_DATA + ["--vocab-size", "128256"], world_size=8)
        assert steps.tst_superposition_steps == 100  # replaces the recipe's ratio, in either flag form


@pytest.mark.unit
def test_recipe_lr_decay_follows_a_shorter_train_iters(tmp_path):
    base = ["--recipe", "600m"] + NO_DATA + ["--vocab-size", "49152"]
    assert _parse(base + ["--train-iters", "3000"], world_size=8).lr_wsd_decay_iters == 300
    assert _parse(base + ["--train-iters=5000"], world_size=8).lr_wsd_decay_iters == 500
    explicit = _parse(base + ["--train-iters", "3000", "--lr-wsd-decay-iters", "1000"], world_size=8)
    assert explicit.lr_wsd_decay_iters == 1000
    config = tmp_path / "run.yaml"
    config.write_text("train_iters: 4000\n")
    assert _parse(base + ["--config", str(config)], world_size=8).lr_wsd_decay_iters == 400
    config.write_text("train_iters: 4000\nlr_wsd_decay_iters: 100\n")
    assert _parse(base + ["--config", str(config)], world_size=8).lr_wsd_decay_iters == 100
    recipe = recipes.get("600m").settings
    assert _parse(base, world_size=8).lr_wsd_decay_iters == recipe["lr-wsd-decay-iters"]


@pytest.mark.unit
def test_unknown_recipe_lists_the_names():
    with pytest.raises(ValueError, match="270m, 600m, 3b, 10b-a1b"):
        recipes.recipe_flags("7b")
    assert recipes.recipe_flags("10B_A1B") == recipes.recipe_flags("10b-a1b")
    text = recipes.describe("10b-a1b")
    assert text.startswith("10b-a1b:") and "--tst-weighting power" in text
    assert " ".join(recipes.recipe_flags("10b-a1b")) in text


# ---------------------------------------------------------------------------------------- parameter counts


def _scaled_down(name):
    """The recipe's model with 2 layers, a 1000-token vocabulary and, for MoE, 8 experts top-2 at EP 1."""
    argv = ["--recipe", name, "--num-layers", "2"] + NO_DATA + ["--vocab-size", "1000"]
    if recipes.get(name).settings.get("num-experts"):
        argv += ["--num-experts", "8", "--moe-router-topk", "2", "--expert-model-parallel-size", "1"]
    return _parse(argv)


@pytest.mark.parallel
@pytest.mark.parametrize("name", recipes.names())
def test_count_parameters_is_exact_for_each_recipe_model(megatron_single_process, name):
    args = _scaled_down(name)
    model, padded = _build(args)
    counts = count_parameters_from_args(args, padded)
    named = dict(model.named_parameters())
    assert counts["total"] == sum(p.numel() for p in named.values())
    assert counts["embedding"] == named["embedding.word_embeddings.weight"].numel()
    assert counts["output_layer"] == named["output_layer.weight"].numel()
    experts = sum(p.numel() for k, p in named.items() if ".experts." in k)
    assert counts["experts"] == experts
    if args.num_experts:
        # active: only top-k of the E experts of each layer
        assert counts["active"] == counts["total"] - experts * (args.num_experts - args.moe_router_topk) // \
            args.num_experts
        assert counts["active"] < counts["total"]
    else:
        assert counts["active"] == counts["total"] and experts == 0
    assert counts["total_non_embedding"] == counts["total"] - counts["embedding"] - counts["output_layer"]


@pytest.mark.parallel
@pytest.mark.parametrize("variant", ["layernorm_bias_learned_tied", "moe_pattern_shared_expert_qkv_bias"])
def test_count_parameters_is_exact_for_other_megatron_structures(megatron_single_process, variant):
    argv = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--micro-batch-size", "1", "--train-iters", "10", "--lr", "1e-3"] + NO_DATA + ["--vocab-size", "300"]
    if variant == "layernorm_bias_learned_tied":
        argv += ["--normalization", "LayerNorm", "--ffn-hidden-size", "96", "--max-position-embeddings", "48",
                 "--group-query-attention", "--num-query-groups", "2", "--qk-layernorm"]
    else:
        argv += ["--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope", "--kv-channels", "24",
                 "--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "40",
                 "--moe-shared-expert-intermediate-size", "56", "--moe-layer-freq", "[0]+[1]*3",
                 "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--add-qkv-bias"]
    args = _parse(argv)
    model, padded = _build(args)
    counts = count_parameters_from_args(args, padded)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    if args.num_experts:
        experts = sum(p.numel() for k, p in model.named_parameters() if ".experts." in k)
        assert counts["active"] == counts["total"] - experts // 2
    else:
        assert counts["position_embedding"] == 48 * 64 and counts["output_layer"] == 0


@pytest.mark.unit
def test_10b_a1b_sizes_match_the_spec():
    recipe = recipes.get("10b-a1b")
    args = _parse(["--recipe", "10b-a1b"] + NO_DATA + ["--vocab-size", str(recipe.vocab_size)], world_size=8)
    counts = count_parameters(configs.model_shape_from_args(args, 151936), qk_layernorm=True)
    assert counts == count_parameters_from_args(args, 151936)
    assert counts["total_non_embedding"] == pytest.approx(10.02e9, rel=0.01)
    assert counts["active_non_embedding"] == pytest.approx(0.96e9, rel=0.01)
    assert counts["embedding"] + counts["output_layer"] == pytest.approx(0.47e9, rel=0.01)
    # exact: 32 x (attention 11,010,048 + norms 3,328 + router 196,608 + 128 x 2,359,296) + final norm 1,536
    assert counts["total_non_embedding"] == 10_022_397_440
    assert counts["active_non_embedding"] == 962_700_800
    assert counts["embedding"] == counts["output_layer"] == 151_936 * 1536


# ------------------------------------------------------------------------------------------------- planner


@pytest.mark.unit
def test_plan_json_for_10b_a1b():
    from megatron_tst.flops import training_flops_per_step

    proc = subprocess.run([sys.executable, PLAN, "--recipe", "10b-a1b", "--nodes", "4", "--mfu", "0.4", "--json"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    for key in ("total_params", "active_params", "total_params_non_embedding", "active_params_non_embedding",
                "flops_per_step", "tokens_per_step", "steps", "memory_gb_per_gpu"):
        assert key in plan, key
    assert plan["total_params_non_embedding"] == 10_022_397_440
    assert plan["active_params_non_embedding"] == 962_700_800
    assert plan["total_params"] - plan["total_params_non_embedding"] == plan["embedding_params"] == \
        plan["active_params"] - plan["active_params_non_embedding"] == 2 * 152_064 * 1536  # padded alike, TP 1-8
    assert plan["steps"] == {"superposition": 12495, "recovery": 49983 - 12495, "total": 49983}
    positions = 8192 * 1024
    assert plan["tokens_per_step"] == {"superposition": 16 * positions, "recovery": positions}
    assert plan["tokens_total"]["total"] == 12495 * 16 * positions + (49983 - 12495) * positions
    args = _parse(["--recipe", "10b-a1b"] + NO_DATA + ["--vocab-size", "151936"], world_size=32)
    assert plan["flops_per_step"] == training_flops_per_step(configs.model_shape_from_args(args, 152064),
                                                             8192, 1024)
    mem = plan["memory_gb_per_gpu"]
    parts = mem["weights"] + mem["gradients"] + mem["optimizer"] + mem["activations"] + mem["logits"]
    assert mem["total"] == pytest.approx(parts)
    assert mem["weights"] * 2 ** 30 == pytest.approx(2 * mem["params_on_gpu"])  # bf16
    assert mem["gradients"] == pytest.approx(2 * mem["weights"])  # fp32 main grads
    assert plan["layout"]["world_size"] == 32 and plan["layout"]["data_parallel"] == 32
    assert plan["layout"]["microbatches_per_step"] == 1024 // 32
    # 4 nodes: experts over EP 8 (16 per GPU, all 32 layers) + the replicated rest
    assert mem["params_on_gpu"] == 10_489_538_048 - 32 * 112 * 2_359_296
    assert 20 < mem["total"] < 80
    time = plan["time"]
    assert time["step_seconds"] == pytest.approx(plan["flops_per_step"] / (0.4 * 989e12 * 32))


@pytest.mark.unit
def test_plan_refuses_heads_not_divisible_by_tp():
    proc = subprocess.run([sys.executable, PLAN, "--recipe", "270m", "--gpus-per-node", "5",
                           "--tensor-model-parallel-size", "5"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert "--num-attention-heads 9 is not divisible by TP=5" in proc.stderr


@pytest.mark.unit
@pytest.mark.parametrize("argv, message", [
    (["--recipe", "10b-a1b", "--expert-model-parallel-size", "3", "--gpus-per-node", "6"],
     "--num-experts 128 is not divisible by EP=3"),
    (["--recipe", "10b-a1b", "--expert-model-parallel-size", "16"], "does not divide the 8 ranks"),
    (["--recipe", "3b", "--tensor-model-parallel-size", "4", "--gpus-per-node", "6"],
     "world size 6 is not a multiple of TP x PP x CP"),
    (["--recipe", "3b", "--seq-length", "2048", "--tst-sample-layout", "segments"],
     "must be divisible by --tst-bag-size 6 with --tst-sample-layout segments"),
    (["--recipe", "600m", "--tensor-model-parallel-size", "2", "--gpus-per-node", "2"],
     "--num-attention-heads 15 is not divisible by TP=2"),
    (["--recipe", "7b"], "known recipes are 270m, 600m, 3b, 10b-a1b"),
])
def test_plan_refuses_layouts_that_cannot_work(capsys, argv, message):
    assert _plan_module().main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


@pytest.mark.unit
def test_plan_text_output_and_time(capsys):
    assert _plan_module().main(["--recipe", "270m", "--tokens-per-second", "300000"]) == 0
    out = capsys.readouterr().out
    assert "253.954M" in out and "superposition  6000" in out and "recovery       14000" in out
    assert "time at 300,000 positions/s/GPU" in out


@pytest.mark.unit
def test_plan_accounts_for_the_fused_output_layer_and_loss():
    """With Megatron-LM's linear loss fusion the logits term is one chunk's logits, the per-position statistics
    the fp32 hidden gradient and the float32 weight-gradient accumulator (eager gradients) with its GEMM's block
    temporary instead of
    [positions, V/tp] bf16 logits + their fp32 softmax."""
    from megatron_tst.mce import CHUNK_LOGITS_BYTES, default_chunk_size

    plan_tool = _plan_module()
    stock = plan_tool.plan("600m", [])
    unfused = stock["memory_gb_per_gpu"]
    fused = plan_tool.plan("600m", ["--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "linear"])
    fused = fused["memory_gb_per_gpu"]
    # micro batch x seq; Llama 3's 128,256 ids padded as the recipe pads them (TP=1)
    positions, vocab, hidden, bag = 8 * 2016, stock["padded_vocab_size"], 960, 6
    assert stock["layout"]["tensor_model_parallel"] == 1 and vocab >= 128256
    assert unfused["logits"] * 2**30 == pytest.approx(positions * ((2 + 4) * vocab + 2 * 2 * hidden))
    chunk = default_chunk_size(vocab, positions)
    assert chunk == 260  # 128 MiB of fp32 logits
    expected = (chunk * (6 * vocab + 4 * hidden) + positions * (9 + 12 * bag + 4 * hidden) + 4 * vocab * hidden
                + CHUNK_LOGITS_BYTES)  # bf16 GEMMs: one row block's fp32 weight-gradient GEMM result
    assert fused["logits"] * 2**30 == pytest.approx(expected)
    assert fused["logits"] < unfused["logits"] / 12  # 14x less at the 600m shape
    assert fused["total"] - fused["logits"] == pytest.approx(unfused["total"] - unfused["logits"])
    # native/te keep the stock loss, as Megatron's fused CE kernels compute the same loss
    native = plan_tool.plan("600m", ["--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "native"])
    assert native["memory_gb_per_gpu"]["logits"] == pytest.approx(unfused["logits"])
