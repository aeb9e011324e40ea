"""Hand-back to Megatron-LM: a checkpoint our trainer wrote after both phases loads with stock Megatron-LM pieces.

Our trainer (`megatron_tst.pretrain`, in process) trains 2 superposition + 2 recovery steps and saves, for a dense
and a MoE model, at TP=1 (DP=2) and TP=2 (MoE: + sequence parallelism, which Megatron-LM requires for MoE with TP).
Each checkpoint is then loaded three ways on the same layout, in the same 2 spawned processes:

- ours: Megatron-LM's `setup_model_and_optimizer` with our model provider (TSTGPTModel) and forward step;
- stock: Megatron-LM's command line without `--tst-*` (the CPU flags the Megatron-LM fixtures' generator passed),
  parsed without our extra arguments, a Megatron-Core `GPTModel` built as Megatron-LM's `gpt_builder` builds it
  (local layer spec, MoE block spec), Megatron-LM's own `load_checkpoint` (not our wrapper of it) inside its
  `setup_model_and_optimizer`, and a forward step written as `pretrain_gpt.py`'s;
- stock with `--use-checkpoint-args`: the same without any model flag on the command line (Megatron-LM's
  `load_args_from_checkpoint` reads them from our saved args).

Each evaluates one fixed batch (forward-only schedule, eval mode): the stock losses equal ours to 1e-5 (relative),
and the iteration and consumed samples are the saved ones.
"""

import contextlib
import json

import pytest
from cli import VOCAB, read_jsonl, run_in_workers, tiny_args
from test_checkpoints import eval_loss, initialize, setup, stock_micro_batch

pytestmark = pytest.mark.e2e

TP2, SP = ["--tensor-model-parallel-size", "2"], ["--sequence-parallel"]
CASES = {"dense_tp1": (False, []), "dense_tp2": (False, TP2), "moe_tp1": (True, []), "moe_tp2_sp": (True, TP2 + SP)}
TRAIN_ITERS, SUPERPOSITION_ITERS = 4, 2
# what the Megatron-LM fixtures' generator passed to run Megatron-LM on CPU (our entry sets them as defaults)
STOCK_CPU = ("--transformer-impl local --use-cpu-initialization --no-gradient-accumulation-fusion "
             "--no-masked-softmax-fusion --no-bias-swiglu-fusion --no-rope-fusion --no-bias-dropout-fusion "
             "--no-persist-layer-norm --distributed-backend gloo").split()
# the model flags of tiny_args, with how many values each takes (left out with --use-checkpoint-args)
MODEL_FLAGS = {"--num-layers": 1, "--hidden-size": 1, "--num-attention-heads": 1, "--group-query-attention": 0,
               "--num-query-groups": 1, "--ffn-hidden-size": 1, "--seq-length": 1, "--max-position-embeddings": 1,
               "--position-embedding-type": 1, "--normalization": 1, "--swiglu": 0, "--disable-bias-linear": 0,
               "--untie-embeddings-and-output-weights": 0, "--attention-dropout": 1, "--hidden-dropout": 1,
               "--num-experts": 1, "--moe-router-topk": 1, "--moe-ffn-hidden-size": 1}


def without_model_flags(argv):
    out, i = [], 0
    while i < len(argv):
        if argv[i] in MODEL_FLAGS:
            i += 1 + MODEL_FLAGS[argv[i]]
        else:
            out.append(argv[i])
            i += 1
    return out


def fixed_batch():
    """One micro-batch (the trainer's micro-batch size 2, --seq-length 32) of fixed random token ids."""
    import torch

    generator = torch.Generator().manual_seed(2024)
    return stock_micro_batch(torch.randint(0, VOCAB, (2, 33), generator=generator).tolist())


# ---------------------------------------------------------------------------------------- stock Megatron-LM


def stock_model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    """Megatron-Core's GPTModel as Megatron-LM's `gpt_builders.gpt_builder` builds it for these flags (local
    implementation: `get_gpt_layer_local_spec`, or `get_gpt_decoder_block_spec` with experts); no TST class."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
    from megatron.training import get_args
    from megatron.training.arguments import core_transformer_config_from_args

    args = get_args()
    assert args.transformer_impl == "local" and args.spec is None
    config = config or core_transformer_config_from_args(args)
    if args.num_experts:
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=args.normalization,
                                          qk_l2_norm=args.qk_l2_norm, vp_stage=vp_stage)
    else:
        spec = get_gpt_layer_local_spec(num_experts=args.num_experts, moe_grouped_gemm=args.moe_grouped_gemm,
                                        qk_layernorm=args.qk_layernorm,
                                        multi_latent_attention=args.multi_latent_attention,
                                        normalization=args.normalization)
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=args.padded_vocab_size,
                    max_sequence_length=args.max_position_embeddings, pre_process=pre_process,
                    post_process=post_process, fp16_lm_cross_entropy=args.fp16_lm_cross_entropy, parallel_output=True,
                    share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                    position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
                    rotary_base=args.rotary_base, rope_scaling=args.use_rope_scaling, vp_stage=vp_stage,
                    pg_collection=pg_collection)


def _stock_loss(loss_mask, output_tensor):
    import torch

    losses, mask = output_tensor.view(-1).float(), loss_mask.view(-1).float()
    loss, tokens = torch.sum(losses * mask), mask.sum().to(torch.int)
    return loss, tokens, {"lm loss": torch.cat([loss.detach().view(1), tokens.view(1)])}


def stock_forward_step(data_iterator, model):
    """`pretrain_gpt.py`'s forward step for a stock micro-batch every rank reads whole (no TP broadcast needed)."""
    from functools import partial

    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"],
                   loss_mask=batch["loss_mask"])
    return output, partial(_stock_loss, batch["loss_mask"])


@contextlib.contextmanager
def megatron_lm_own_load_checkpoint():
    """Within: `setup_model_and_optimizer` calls Megatron-LM's `load_checkpoint` itself, not our wrapper of it."""
    from megatron.training import training

    wrapper = training.load_checkpoint
    training.load_checkpoint = getattr(wrapper, "__wrapped_by_megatron_tst__", wrapper)
    try:
        yield
    finally:
        training.load_checkpoint = wrapper


# ------------------------------------------------------------------------------------------------- the worker


def _loaded(model, forward_step=None):
    from megatron.training import get_args

    args = get_args()
    return {"eval": eval_loss(model, [fixed_batch()], forward_step), "iteration": args.iteration,
            "consumed_train_samples": args.consumed_train_samples}


def handback_worker(directory):
    from megatron.core.utils import unwrap_model
    from megatron.training import get_args

    from megatron_tst.testing.megatron_lm import run_pretrain, teardown

    results = {}
    for case, (moe, layout) in CASES.items():
        save, metrics = f"{directory}/{case}", f"{directory}/{case}.jsonl"
        tst = tiny_args(train_iters=TRAIN_ITERS, superposition_iters=SUPERPOSITION_ITERS, moe=moe) + layout
        out = results[case] = {}
        out["trained"] = run_pretrain(tst + ["--save", save, "--save-interval", str(TRAIN_ITERS),
                                             "--metrics-jsonl", metrics])
        initialize(tst + ["--load", save])
        out["ours"] = _loaded(setup()[0])
        stock = tiny_args(train_iters=TRAIN_ITERS, bag_size=None, moe=moe) + layout + STOCK_CPU + ["--load", save]
        for name, argv in (("stock", stock), ("checkpoint_args", without_model_flags(stock) +
                                                                  ["--use-checkpoint-args"])):
            initialize(argv, on_validated=lambda args: None, extra_args_provider=None)
            with megatron_lm_own_load_checkpoint():
                model = setup(stock_model_provider)[0]
            out[name] = _loaded(model, stock_forward_step)
            args = get_args()
            out[name]["model_args"] = (args.num_layers, args.hidden_size, args.ffn_hidden_size, args.seq_length,
                                       args.num_query_groups, args.num_experts, args.swiglu,
                                       args.untie_embeddings_and_output_weights)
            out[name]["model_class"] = type(unwrap_model(model[0])).__name__
        teardown()
    return results


@pytest.fixture(scope="module")
def handed_back(tmp_path_factory):
    directory = tmp_path_factory.mktemp("handback")
    results = run_in_workers(handback_worker, 2, args=(str(directory),))
    with open(directory / "losses.json", "w") as f:  # for a look afterwards: how close the losses are
        json.dump({case: {way: results[-1][case][way]["eval"] for way in ("ours", "stock", "checkpoint_args")}
                   for case in CASES}, f, indent=1)
    return directory, results


@pytest.mark.parametrize("case", CASES)
def test_our_checkpoint_after_both_phases_loads_in_stock_megatron_lm_with_our_loss(handed_back, case):
    directory, results = handed_back
    assert [r[case]["trained"] for r in results] == [0, 0]
    phases = [r["phase"] for r in read_jsonl(directory / f"{case}.jsonl", "train")]
    assert "superposition" in phases and phases[-1] == "recovery"  # both phases before the save
    last = results[-1][case]  # the last rank holds the loss (TP ranks agree)
    for way in ("stock", "checkpoint_args"):
        assert last[way]["model_class"] == "GPTModel"
        assert last[way]["eval"] == pytest.approx(last["ours"]["eval"], rel=1e-5), way
        for rank in results:
            assert rank[case][way]["iteration"] == TRAIN_ITERS
            assert rank[case][way]["consumed_train_samples"] == TRAIN_ITERS * 8  # --global-batch-size 8


@pytest.mark.parametrize("case", CASES)
def test_use_checkpoint_args_rebuilds_the_model_from_our_saved_args(handed_back, case):
    """Without model flags on its command line Megatron-LM's `load_args_from_checkpoint` finds every field it
    needs in our checkpoint's args, under its names: the same model as from the full command line."""
    _, results = handed_back
    last = results[-1][case]
    assert last["checkpoint_args"]["model_args"] == last["stock"]["model_args"]
    assert last["stock"]["model_args"][:4] == (2, 64, 128, 32)
