"""Recipes (megatron_tst/recipes.py), parameter counts (megatron_tst/params.py) and the planner (tools/plan.py).

References: Megatron-LM's own parser and validation (recipes), models built by the trainer's own model provider
(parameter counts), the paper's numbers (TST_SPEC 5), Megatron-LM's `theoretical_memory_usage` (weights and
optimizer), and FLOPs rebuilt from the counted matrices.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys

import pytest
from test_arguments import entry_args, megatron_globals, megatron_parse
from test_real_configs import ROOT, megatron_lm_verdict, megatron_release, plan_tool

from megatron_tst import recipes
from megatron_tst.params import ModelShape, count_parameters, rank_parameters

PLAN = str(ROOT / "tools" / "plan.py")
NO_DATA = ["--mock-data", "--tokenizer-type", "NullTokenizer"]
ENV = {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}


def _tst_flags(settings):
    return {k for k in settings if k.startswith("tst-")}


def _plan(argv, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return plan_tool().plan(argv, **kwargs)


# ------------------------------------------------------------------------------------------------- recipes


@pytest.mark.unit
@pytest.mark.parametrize("name", recipes.names())
def test_every_recipe_flag_is_megatron_lms_with_megatron_lms_meaning(name):
    """Each flag is an option of Megatron-LM's own parser (this release's), its parsed value is the recipe's, and
    Megatron-LM's own validation accepts the recipe at its 8-GPU layout."""
    from test_arguments import _megatron_actions

    recipe = recipes.get(name)
    actions = _megatron_actions()
    megatron_flags = [f for f in recipe.flags() if f.startswith("--") and f[2:] not in _tst_flags(recipe.settings)]
    unknown = [f for f in megatron_flags if f not in actions]
    assert not unknown, f"not Megatron-LM flags: {unknown}"
    argv = []
    for key, value in recipe.settings.items():
        if key not in _tst_flags(recipe.settings):
            argv += [f"--{key}"] if value is True else [f"--{key}", recipes._format(value)]
    argv += NO_DATA + ["--vocab-size", str(recipe.vocab_size)]
    parsed = vars(megatron_parse(argv, world_size=8))
    for key, value in recipe.settings.items():
        if key in _tst_flags(recipe.settings):
            continue
        action = actions[f"--{key}"]
        expected = action.const if value is True else \
            (action.type(recipes._format(value)) if action.type else str(value))  # a switch: its store_const value
        got = parsed[action.dest]
        assert got == expected or (isinstance(got, list) and got == [expected]), (key, got, expected)
    assert megatron_lm_verdict(argv, 8, ENV) is None


@pytest.mark.unit
@pytest.mark.parametrize("name", recipes.names())
def test_every_recipe_plans_at_its_layout(name):
    recipe = recipes.get(name)
    plan = _plan(["--recipe", name])
    s = recipe.settings
    layout = plan["layout"]
    assert (layout["world_size"], layout["expert_model_parallel"]) == (8, s.get("expert-model-parallel-size", 1))
    assert layout["data_parallel"] == 8 and layout["global_batch_size"] == 1024
    assert plan["vocab_size"] == recipe.vocab_size and plan["seq_length"] == s["seq-length"]
    assert plan["steps"]["superposition"] == math.floor(s["tst-superposition-ratio"] * s["train-iters"])
    assert plan["tst"]["bag_size"] == s["tst-bag-size"]
    # the same padded vocabulary at every TP the recipe allows (checkpoints reshard across them)
    padded = {_plan(["--recipe", name, "--tensor-model-parallel-size", str(tp)], gpus_per_node=8 * tp)
              ["padded_vocab_size"] for tp in recipes.tensor_parallel_sizes(s) if tp > 1 and s["seq-length"] % tp == 0}
    assert padded <= {plan["padded_vocab_size"]}


@pytest.mark.unit
def test_recipe_settings_match_the_paper():
    lrs = {"270m": 2e-3, "600m": 1e-3, "3b": 2e-4, "10b-a1b": 3e-4}
    for name, lr in lrs.items():
        s = recipes.get(name).settings
        assert s["lr"] == lr and s["min-lr"] == pytest.approx(lr / 10)
        assert s["max-position-embeddings"] == s["seq-length"] and s["group-query-attention"] is True
    shapes = {"270m": (576, 30, 9, 3, 1536), "600m": (960, 32, 15, 5, 2560), "3b": (2048, 36, 16, 4, 11008)}
    for name, (hidden, layers, heads, groups, ffn) in shapes.items():
        s = recipes.get(name).settings
        assert (s["hidden-size"], s["num-layers"], s["num-attention-heads"], s["num-query-groups"],
                s["ffn-hidden-size"]) == (hidden, layers, heads, groups, ffn)
        assert (s["tst-bag-size"], s["tst-superposition-ratio"], s["train-iters"]) == (6, 0.3, 20000)
        assert 2.0e6 <= s["seq-length"] * s["global-batch-size"] <= 2.2e6  # "about 2M tokens per step"
    moe = recipes.get("10b-a1b").settings
    assert (moe["tst-bag-size"], moe["tst-superposition-ratio"], moe["train-iters"]) == (16, 0.25, 49983)
    assert moe["seq-length"] * moe["global-batch-size"] == 8192 * 1024 and moe["rotary-base"] == 50000
    assert (moe["hidden-size"], moe["num-layers"], moe["num-attention-heads"], moe["num-query-groups"]) == \
        (1536, 32, 24, 4)
    assert (moe["num-experts"], moe["moe-router-topk"], moe["moe-ffn-hidden-size"], moe["kv-channels"]) == \
        (128, 8, 512, 128)
    assert "moe-shared-expert-intermediate-size" not in moe and moe["qk-layernorm"] is True


@pytest.mark.unit
def test_unknown_recipe_lists_the_names():
    with pytest.raises(ValueError, match="270m, 600m, 3b, 10b-a1b"):
        recipes.recipe_flags("7b")
    assert recipes.recipe_flags("10B_A1B") == recipes.recipe_flags("10b-a1b")
    text = recipes.describe("10b-a1b")
    assert text.startswith("10b-a1b:") and "--tst-weighting power" in text
    assert " ".join(recipes.recipe_flags("10b-a1b")) in text


# ---------------------------------------------------------------------------------------- parameter counts


def _built_model(argv):
    """The trainer's model (`loop.providers.model_provider`) for our entry's arguments of `argv`, in this 1-rank
    world; returns (model, args)."""
    from megatron.core.tokenizers.utils.build_tokenizer import vocab_size_with_padding

    from megatron_tst.loop import providers
    from megatron_tst.loop import run as tst_run

    args = entry_args(argv)
    args.padded_vocab_size = vocab_size_with_padding(args.vocab_size, args, logging_enabled=False)
    with megatron_globals(args), contextlib.redirect_stdout(io.StringIO()):
        tst_run.start(args)
        model = providers.model_provider()
    return model, args


def _check_counts(model, args):
    counts = count_parameters(ModelShape.from_args(args, args.padded_vocab_size))
    named = dict(model.named_parameters())
    assert counts["total"] == sum(p.numel() for p in named.values())
    assert counts["embedding"] == named["embedding.word_embeddings.weight"].numel()
    experts = sum(p.numel() for k, p in named.items() if ".experts." in k)
    assert counts["experts"] == experts
    assert counts["router"] == sum(p.numel() for k, p in named.items() if ".router." in k)
    if args.num_experts:
        pattern = ModelShape.from_args(args, args.padded_vocab_size).moe_layer_pattern()
        per_expert = experts // (args.num_experts * sum(pattern))
        assert counts["active"] == counts["total"] - per_expert * (args.num_experts - args.moe_router_topk) * \
            sum(pattern)
    else:
        assert counts["active"] == counts["total"] and experts == 0
    output = named.get("output_layer.weight")
    assert counts["output_layer"] == (output.numel() if output is not None else 0)
    return counts


@pytest.mark.parallel
@pytest.mark.parametrize("name", recipes.names())
def test_counts_equal_the_built_model_of_each_recipe(megatron_single_process, name):
    """The recipe's structure with 2 layers, a 1000-id vocabulary and, for MoE, 8 experts top-2 on one rank."""
    argv = ["--recipe", name, "--num-layers", "2", "--vocab-size", "1000"] + NO_DATA
    if recipes.get(name).settings.get("num-experts"):
        argv += ["--num-experts", "8", "--moe-router-topk", "2", "--expert-model-parallel-size", "1"]
    model, args = _built_model(argv)
    counts = _check_counts(model, args)
    assert counts["total_non_embedding"] == counts["total"] - counts["embedding"] - counts["output_layer"]


@pytest.mark.parallel
@pytest.mark.parametrize("variant", ["layernorm_bias_learned_tied_qknorm", "moe_pattern_biases",
                                     "moe_shared_expert_gate_qknorm"])
def test_counts_equal_the_built_model_of_other_structures(megatron_single_process, variant):
    argv = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--max-position-embeddings", "48", "--micro-batch-size", "1", "--global-batch-size", "1",
            "--train-iters", "10", "--lr", "1e-3", "--vocab-size", "300"] + NO_DATA
    if variant == "layernorm_bias_learned_tied_qknorm":
        argv += ["--normalization", "LayerNorm", "--ffn-hidden-size", "96", "--group-query-attention",
                 "--num-query-groups", "2", "--qk-layernorm"]
    else:
        argv += ["--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope", "--kv-channels", "24",
                 "--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "40", "--moe-layer-freq",
                 "[0]+[1]*3", "--untie-embeddings-and-output-weights"]
        if variant == "moe_shared_expert_gate_qknorm":  # (Megatron's shared experts have no biases)
            argv += ["--moe-shared-expert-intermediate-size", "56", "--moe-shared-expert-gate", "--qk-layernorm",
                     "--disable-bias-linear", "--add-qkv-bias"]
    model, args = _built_model(argv)
    counts = _check_counts(model, args)
    if variant.startswith("layernorm"):
        assert counts["position_embedding"] == 48 * 64 and counts["output_layer"] == 0
    elif variant == "moe_pattern_biases":  # biases on: qkv, projections, MLP, experts and the router
        assert counts["router"] == 3 * (4 * 64 + 4)  # 3 MoE layers: weight [E, h] + bias [E]
    else:
        shared = sum(p.numel() for k, p in model.named_parameters() if ".shared_experts." in k)
        assert counts["shared_experts"] == shared == 3 * (2 * 56 * 64 + 64 * 56 + 64)  # fc1, fc2, gate [1, h]


@pytest.mark.unit
def test_rank_counts_add_up_over_the_layout():
    """Per-rank counts of every pipeline stage / expert rank add up to the model (plus the tied copy of the word
    embedding on the last stage)."""
    for tied in (False, True):
        shape = ModelShape(num_layers=8, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, vocab_size=512,
                           num_query_groups=2, swiglu=True, num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=32,
                           moe_layer_freq=[0, 1, 1, 1, 0, 1, 1, 1], qk_layernorm=True,
                           untie_embeddings_and_output_weights=not tied)
        total = count_parameters(shape)["total"]
        stages = [[0, 1, 2], [3, 4], [5], [6, 7]]
        by_stage = [rank_parameters(shape, layers, first_stage=i == 0, last_stage=i == 3)
                    for i, layers in enumerate(stages)]
        assert sum(c["total"] for c in by_stage) == total + (512 * 64 if tied else 0)
        whole = rank_parameters(shape, range(8), ep=1)["expert"]
        assert sum(rank_parameters(shape, range(8), ep=4)["expert"] for _ in range(4)) == whole


@pytest.mark.unit
def test_10b_a1b_sizes_match_the_spec():
    plan = _plan(["--recipe", "10b-a1b"])
    counts = plan["params_breakdown"]
    assert counts["total_non_embedding"] == pytest.approx(10.02e9, rel=0.01)  # "10B-A1B"
    assert counts["active_non_embedding"] == pytest.approx(0.96e9, rel=0.01)
    # exact: 32 x (attention 11,010,048 + norms 3,328 + router 196,608 + 128 x 2,359,296) + final norm 1,536
    assert counts["total_non_embedding"] == 10_022_397_440
    assert counts["active_non_embedding"] == 962_700_800
    assert counts["embedding"] == counts["output_layer"] == 152_064 * 1536  # 151,936 padded alike at TP 1-8


# ---------------------------------------------------------------------------------------------------- FLOPs


@pytest.mark.unit
@pytest.mark.parametrize("name", ["600m", "10b-a1b"])
def test_flops_are_six_per_parameter_of_the_matrices_plus_causal_attention(name):
    """Megatron-LM's count (the planner reports it) rebuilt from the counted matrices: 6 FLOPs per weight of every
    GEMM a position passes (attention projections, its top-k experts or the MLP, the output layer) plus
    6 L (n_q d) per position and layer for causal attention (QK^T and AV at half the L x L)."""
    plan = _plan(["--recipe", name])
    s, counts = recipes.get(name).settings, plan["params_breakdown"]
    head_dim = s.get("kv-channels", s["hidden-size"] // s["num-attention-heads"])
    positions = s["global-batch-size"] * s["seq-length"]
    gemm_weights = (counts["attention"] + counts["dense_mlp"] + counts["experts_active"] + counts["shared_experts"]
                    + plan["padded_vocab_size"] * s["hidden-size"])
    attention = s["seq-length"] * s["num-attention-heads"] * head_dim * s["num-layers"]
    assert plan["flops_per_step"] == pytest.approx(6 * positions * (gemm_weights + attention), rel=1e-12)
    assert plan["flops_total"] == pytest.approx(plan["flops_per_step"] * s["train-iters"], rel=1e-12)


# --------------------------------------------------------------------------------------------------- memory


@pytest.mark.unit
def test_weights_and_optimizer_agree_with_megatron_lms_theoretical_memory():
    dense = _plan(["--recipe", "600m"])
    mem, megatron = dense["memory_gb_per_gpu"], dense["megatron_lm_memory_estimate_gb"]
    ours = mem["weights"] + mem["gradients"] + mem["optimizer"]
    assert ours == pytest.approx(megatron["weights_and_optimizer"], rel=1e-9)  # bf16, fp32 grads, 12/DP bytes
    assert mem["weights"] * 2 ** 30 == pytest.approx(2 * mem["params_on_gpu"])
    if megatron_release() != "0.17":  # 0.17's estimate ignores expert parallelism
        moe = _plan(["--recipe", "10b-a1b"])
        mem, megatron = moe["memory_gb_per_gpu"], moe["megatron_lm_memory_estimate_gb"]
        assert mem["weights"] + mem["gradients"] + mem["optimizer"] == \
            pytest.approx(megatron["weights_and_optimizer"], rel=1e-4)  # it leaves out the q/k norms


@pytest.mark.unit
def test_plan_accounts_for_the_fused_output_layer_and_loss():
    """With Megatron-LM's linear loss fusion the logits term is one chunk's logits, the per-position statistics,
    the fp32 hidden gradient and the float32 weight-gradient accumulator with its GEMM's block temporary, instead
    of [positions, V/tp] bf16 logits + their fp32 softmax."""
    from megatron_tst.mce import CHUNK_LOGITS_BYTES, default_chunk_size

    stock = _plan(["--recipe", "600m"])
    unfused = stock["memory_gb_per_gpu"]
    fused = _plan(["--recipe", "600m", "--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "linear"])
    fused = fused["memory_gb_per_gpu"]
    positions, vocab, hidden, bag = 8 * 2016, stock["padded_vocab_size"], 960, 6
    assert stock["layout"]["tensor_model_parallel"] == 1 and vocab >= 128256
    assert unfused["logits"] * 2 ** 30 == pytest.approx(positions * ((2 + 4) * vocab + 2 * 2 * hidden))
    chunk = default_chunk_size(vocab, positions)
    expected = (chunk * (6 * vocab + 4 * hidden) + positions * (9 + 12 * bag + 4 * hidden) + 4 * vocab * hidden
                + CHUNK_LOGITS_BYTES)
    assert fused["logits"] * 2 ** 30 == pytest.approx(expected)
    assert fused["logits"] < unfused["logits"] / 12
    assert fused["total"] - fused["logits"] == pytest.approx(unfused["total"] - unfused["logits"])
    native = _plan(["--recipe", "600m", "--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "native"])
    assert native["memory_gb_per_gpu"]["logits"] == pytest.approx(unfused["logits"])


@pytest.mark.unit
def test_pipeline_stages_follow_megatron_core():
    """Uneven first/last stages and virtual stages as Megatron-Core places them; the busiest stage is reported."""
    plan = _plan(["--recipe", "3b", "--pipeline-model-parallel-size", "4", "--decoder-first-pipeline-num-layers", "6",
                  "--decoder-last-pipeline-num-layers", "6"])
    assert plan["layout"]["layers_per_stage"] == [6, 12, 12, 6] and plan["layout"]["data_parallel"] == 2
    vpp = _plan(["--recipe", "3b", "--pipeline-model-parallel-size", "4", "--num-virtual-stages-per-pipeline-rank",
                 "3"])
    assert vpp["layout"]["layers_per_stage"] == [9, 9, 9, 9] and vpp["layout"]["virtual_pipeline_model_parallel"] == 3
    assert not [w for w in plan["warnings"] + vpp["warnings"] if "TransformerConfig" in w]


# ----------------------------------------------------------------------------------------------------- planner


@pytest.mark.unit
def test_plan_json_for_10b_a1b():
    proc = subprocess.run([sys.executable, PLAN, "--recipe", "10b-a1b", "--nodes", "4", "--mfu", "0.4", "--json"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["total_params_non_embedding"] == 10_022_397_440
    assert plan["active_params_non_embedding"] == 962_700_800
    assert plan["total_params"] - plan["total_params_non_embedding"] == plan["embedding_params"] == \
        plan["active_params"] - plan["active_params_non_embedding"] == 2 * 152_064 * 1536
    assert plan["steps"] == {"superposition": 12495, "recovery": 49983 - 12495, "total": 49983}
    assert plan["samples"]["superposition"] == 12495 * 1024
    positions = 8192 * 1024
    assert plan["tokens_per_step"] == {"superposition": 16 * positions, "recovery": positions}
    assert plan["tokens_total"]["total"] == 12495 * 16 * positions + (49983 - 12495) * positions
    mem = plan["memory_gb_per_gpu"]
    parts = mem["weights"] + mem["gradients"] + mem["optimizer"] + mem["activations"] + mem["logits"]
    assert mem["total"] == pytest.approx(parts)
    assert mem["gradients"] == pytest.approx(2 * mem["weights"])  # fp32 main grads
    layout = plan["layout"]
    assert (layout["world_size"], layout["data_parallel"], layout["microbatches_per_step"]) == (32, 32, 32)
    # experts over EP 8 (16 of 128 per GPU, all 32 layers) + the replicated rest
    assert mem["params_on_gpu"] == 10_489_538_048 - 32 * 112 * 2_359_296
    assert 20 < mem["total"] < 80
    assert plan["time"]["step_seconds"] == pytest.approx(plan["flops_per_step"] / (0.4 * 989e12 * 32))


@pytest.mark.unit
def test_plan_text_output_and_time(capsys):
    assert plan_tool().main(["--recipe", "270m", "--tokens-per-second", "300000"]) == 0
    out = capsys.readouterr().out
    assert "253.954M" in out and "superposition  6000" in out and "recovery       14000" in out
    assert "time at 300,000 positions/s/GPU" in out and "Megatron-LM's theoretical_memory_usage" in out


@pytest.mark.unit
@pytest.mark.parametrize("argv, message", [
    (["--recipe", "10b-a1b", "--expert-model-parallel-size", "16"],
     "Megatron-Core refuses the layout (initialize_model_parallel): world_size (8) is not divisible by "
     "expert_tensor_model_pipeline_parallel size (16)"),
    (["--recipe", "3b", "--tensor-model-parallel-size", "4", "--gpus-per-node", "6"],
     "Megatron-LM refuses the command line: world size (6) is not divisible by total_model_size"),
    (["--recipe", "10b-a1b", "--expert-model-parallel-size", "3", "--gpus-per-node", "6", "--global-batch-size",
      "1020"], "Megatron-LM refuses the command line: Number of experts should be a multiple of expert model"),
    (["--recipe", "3b", "--seq-length", "2048", "--max-position-embeddings", "2048", "--tst-sample-layout",
      "segments"], "--seq-length 2048 must be divisible by --tst-bag-size 6 with --tst-sample-layout segments"),
    (["--recipe", "270m", "--tensor-model-parallel-size", "3", "--gpus-per-node", "3", "--seq-length", "2000",
      "--max-position-embeddings", "2000"], "sequence parallelism splits the 2000 superposed positions over TP=3"),
    (["--recipe", "600m", "--tst-superposition-ratio", "1.0"], "--tst-superposition-ratio must be in [0, 1)"),
    (["--recipe", "600m", "--mtp-num-layers", "1"], "--mtp-num-layers: megatron_tst builds no multi-token"),
    (["--recipe", "600m", "--not-a-flag"], "Megatron-LM's parser refuses the command line: unrecognized arguments: "
                                           "--not-a-flag"),
    (["--recipe", "7b"], "--recipe: unknown recipe '7b': known recipes are 270m, 600m, 3b, 10b-a1b"),
    (["--recipe", "600m", "--tokenizer-type", "GPT2BPETokenizer"],
     "cannot load the tokenizer: --tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file"),
    (["--recipe", "600m", "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "meta-llama/Llama-3-8B"],
     "--tokenizer-model as a local tokenizer directory or file (the planner does not download hub ids)"),
])
def test_plan_refuses_with_the_reason(capsys, argv, message):
    assert plan_tool().main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


@pytest.mark.unit
def test_plan_refusal_from_the_command_line_is_exit_2_without_traceback():
    proc = subprocess.run([sys.executable, PLAN, "--recipe", "600m", "--tensor-model-parallel-size", "2",
                           "--gpus-per-node", "2"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("plan.py: error: Megatron-Core refuses the configuration (TransformerConfig): "
                                  "num_attention_heads (15) must be a multiple of tensor_model_parallel_size (2)")


@pytest.mark.unit
def test_plan_with_a_tokenizer_it_can_load_and_with_vocab_size(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["hello", "world", "token", "superposition"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words + ["[UNK]"])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path)
    local = _plan(["--recipe", "270m", "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                   str(tmp_path)])
    assert local["vocab_size"] == 5 and local["vocab_source"].endswith("(loaded)")
    given = _plan(["--recipe", "270m", "--tokenizer-type", "GPT2BPETokenizer", "--vocab-size", "50257"])
    divisor = recipes.get("270m").settings["make-vocab-size-divisible-by"]
    assert given["vocab_size"] == 50257 and given["padded_vocab_size"] == -(-50257 // divisor) * divisor  # TP 1
    null = _plan(["--recipe", "270m", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1000"])
    # Megatron's own NullTokenizer: 0.17 adds an end-of-document id to --vocab-size, 0.19 does not
    assert null["vocab_size"] == (1001 if megatron_release() == "0.17" else 1000)


@pytest.mark.unit
def test_plan_warns_about_schedules_the_paper_does_not_use():
    assert not _plan(["--recipe", "270m"])["warnings"]
    late = _plan(["--recipe", "270m", "--tst-superposition-ratio", "0.95"])["warnings"]
    assert any("reaches into the LR decay" in w for w in late)  # WSD decay: the last 2,000 of 20,000 steps
    short = _plan(["--recipe", "270m", "--train-iters", "3000", "--lr-wsd-decay-iters", "100"])["warnings"]
    assert any("--lr-wsd-decay-iters 100 is 3.3% of --train-iters 3000" in w for w in short)
    assert any("LR warmup (2000 steps) outlasts the superposition phase (900 steps)" in w for w in short)
    baseline = _plan(["--recipe", "270m", "--tst-superposition-ratio", "0"])
    assert baseline["steps"]["superposition"] == 0 and any("same-stream baseline" in w for w in baseline["warnings"])
