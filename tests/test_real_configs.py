"""Real Megatron-LM configurations, written by others, through tools/plan.py with TST's flags added.

Each file in tests/fixtures/real_configs/ is the command line one launch script or test configuration passes to
`pretrain_gpt.py` (Megatron-LM's examples, its functional tests' model_config.yaml, Megatron-MoE-ModelZoo), with a
header naming the source file and commit, and:

    # world-size: N          the GPUs the configuration is launched on
    # env: K=V ...           the environment it sets (Megatron-LM's validation reads CUDA_DEVICE_MAX_CONNECTIONS,
                             NCCL_ALGO, ...)
    # vocab-size: V          for the planner only, when the tokenizer's files are placeholders (it never downloads)
    # expect-0.17: X         what happens with megatron-core 0.17 / 0.19: "accepted", "megatron-lm: <its message>"
    # expect-0.19: X         (refused by Megatron-LM itself) or "megatron-tst: <flag>" (a documented TST refusal)

The reference is Megatron-LM's own `parse_args` + `validate_args` (with `pretrain_gpt.py`'s defaults) + its
`set_global_variables` (the num-microbatches calculator), on the same command line (without the `--tst-*` flags,
which its parser does not know) at the same world size and environment. The planner must accept exactly the
configurations Megatron-LM accepts, refuse the others with Megatron-LM's message, and refuse an accepted one only
for a reason in `megatron_tst.loop.arguments` (ENTRY_REFUSALS / TST_REFUSALS), which the test names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import io
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "real_configs"
TST_FLAGS = ["--tst-bag-size", "4", "--tst-superposition-ratio", "0.3"]
PRETRAIN_GPT_DEFAULTS = {"tokenizer_type": "GPT2BPETokenizer"}  # pretrain_gpt.py's args_defaults


@dataclasses.dataclass
class RealConfig:
    """One fixture: `argv` is the configuration's command line (with `--vocab-size` for the planner when the header
    gives one and the command line has none)."""

    name: str
    argv: List[str]
    world_size: int
    env: Dict[str, str]
    expect: Dict[str, str]
    header: str


def cpu_stand_ins():
    """megatron_tst.platform.cpu (its stand-ins for validating GPU command lines on this CPU machine)."""
    from megatron_tst.platform import cpu

    return cpu


def real_config_names() -> List[str]:
    return sorted(p.stem for p in FIXTURES.glob("*.args"))


def load_real_config(name: str) -> RealConfig:
    """The fixture `name` (file name without .args). Raises KeyError for a header without world-size / env."""
    text = (FIXTURES / f"{name}.args").read_text()
    meta, header = {}, []
    for line in text.splitlines():
        if line.startswith("#"):
            header.append(line)
            key, sep, value = line[1:].partition(":")
            if sep and key.strip() in ("world-size", "env", "vocab-size", "expect-0.17", "expect-0.19"):
                meta[key.strip()] = value.split("  (")[0].strip()
    argv = shlex.split(text, comments=True)
    if "vocab-size" in meta and "--vocab-size" not in argv:
        argv += ["--vocab-size", meta["vocab-size"]]
    env = dict(item.split("=", 1) for item in meta["env"].split())
    return RealConfig(name=name, argv=argv, world_size=int(meta["world-size"]), env=env,
                      expect={"0.17": meta["expect-0.17"], "0.19": meta["expect-0.19"]}, header="\n".join(header))


@functools.lru_cache(maxsize=None)
def plan_tool():
    """tools/plan.py as a module (loaded once)."""
    spec = importlib.util.spec_from_file_location("tst_plan_tool", ROOT / "tools" / "plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def megatron_release() -> str:
    from megatron_tst.platform.mcore_compat import MCORE_VERSION

    return f"{MCORE_VERSION.major}.{MCORE_VERSION.minor}"


@contextlib.contextmanager
def launch_environment(world_size: int, env: Dict[str, str], argv: Optional[List[str]] = None):
    """Rank 0 of `world_size` with `env` set (and `sys.argv` = pretrain_gpt.py + argv); all restored after."""
    keys = set(env) | {"WORLD_SIZE", "RANK", "LOCAL_RANK"}
    saved = {k: os.environ.get(k) for k in keys}
    saved_argv = sys.argv
    os.environ.update(env, WORLD_SIZE=str(world_size), RANK="0", LOCAL_RANK="0")
    if argv is not None:
        sys.argv = ["pretrain_gpt.py"] + list(argv)
    try:
        yield
    finally:
        sys.argv = saved_argv
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def megatron_lm_verdict(argv: List[str], world_size: int, env: Dict[str, str]) -> Optional[str]:
    """Megatron-LM's own verdict on `argv`: None if its parser, `validate_args` and `set_global_variables` (without
    the tokenizer) accept it, else its message. On a machine without CUDA, the device queries answer Hopper's
    (`platform.cpu`, `cpu.device_capability_stand_in`): device facts, not validation logic."""
    from megatron_tst.platform import cpu, megatron_lm

    megatron_lm.prepare_import()
    cpu.install_loop_stand_ins()
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
    from megatron.training import arguments, global_vars

    parse_args = getattr(arguments.parse_args, "__wrapped_by_megatron_tst__", arguments.parse_args)
    stderr = io.StringIO()
    with launch_environment(world_size, env, argv), cpu_stand_ins().device_capability_stand_in(), \
            contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        try:
            args = parse_args()
        except SystemExit:
            return stderr.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
        try:
            arguments.validate_args(args, dict(PRETRAIN_GPT_DEFAULTS))
            global_vars.set_global_variables(args, build_tokenizer=False)
        except Exception as err:  # noqa: BLE001 (the verdict is the message, whatever Megatron-LM raises)
            return str(err) or type(err).__name__
        finally:
            global_vars.unset_global_variables()
            destroy_num_microbatches_calculator()
    return None


def documented_refusals() -> Dict[str, str]:
    """{flag(s): "flag(s): why"} of megatron_tst.loop.arguments' refusals (the `what` without its {value} part)."""
    from megatron_tst.loop import arguments

    return {what.split(" {")[0]: f"{what.split(' {')[0]}: {why}"
            for _, what, why in arguments.ENTRY_REFUSALS + arguments.TST_REFUSALS}


def test_there_are_a_dozen_real_configurations_with_their_sources():
    names = real_config_names()
    assert len(names) >= 12
    for name in names:
        config = load_real_config(name)
        assert "source:" in config.header and config.world_size >= 1, name
        kinds = {value.split(":")[0] for value in config.expect.values()}
        assert kinds <= {"accepted", "megatron-lm", "megatron-tst"}, name


@pytest.mark.parametrize("name", real_config_names())
def test_the_planner_accepts_exactly_what_megatron_lm_accepts(name):
    config = load_real_config(name)
    expected = config.expect[megatron_release()]
    verdict = megatron_lm_verdict(config.argv, config.world_size, config.env)
    tool = plan_tool()
    nodes, gpus = (config.world_size // 8, 8) if config.world_size % 8 == 0 else (1, config.world_size)
    with launch_environment(config.world_size, config.env):
        try:
            plan, refusal = tool.plan(config.argv + TST_FLAGS, nodes=nodes, gpus_per_node=gpus), None
        except tool.PlanError as err:
            plan, refusal = None, err
    if verdict is not None:  # Megatron-LM refuses it: so does the planner, with Megatron-LM's message
        assert expected.startswith("megatron-lm: ") and expected[len("megatron-lm: "):] in verdict, verdict
        assert refusal is not None and refusal.source == "megatron-lm", refusal
        assert verdict in str(refusal)
        return
    assert not expected.startswith("megatron-lm"), f"Megatron-LM accepts {name}, the fixture expects: {expected}"
    if expected.startswith("megatron-tst: "):  # only a documented TST reason refuses what Megatron-LM accepts
        assert refusal is not None and refusal.source == "megatron-tst", refusal
        flag = expected[len("megatron-tst: "):]
        assert documented_refusals()[flag] in str(refusal)
        return
    assert refusal is None, f"{name}: Megatron-LM accepts it, the planner refuses: {refusal}"
    layout = plan["layout"]
    assert layout["world_size"] == config.world_size
    assert layout["tensor_model_parallel"] * layout["pipeline_model_parallel"] * layout["context_parallel"] * \
        layout["data_parallel"] == config.world_size
    steps = plan["steps"]
    assert steps["superposition"] == math.floor(0.3 * steps["total"] + 1e-9) and steps["recovery"] > 0
    assert plan["tokens_per_step"]["superposition"] == 4 * plan["tokens_per_step"]["recovery"]
    assert plan["total_params"] >= plan["active_params"] > plan["active_params_non_embedding"] > 0
    assert sum(layout["layers_per_stage"]) == int(config.argv[config.argv.index("--num-layers") + 1])
    assert plan["memory_gb_per_gpu"]["total"] > 0 and plan["flops_per_step"] > 0


# Published sizes of the models whose real configurations are accepted (the architecture's parameter count,
# embeddings included): the planner's counts are the built models' (tests/test_recipes_and_plan.py) and land on them.
PUBLISHED_BILLIONS = {"ex_llama3_8b_h100_fp8": 8.03, "ex_mixtral_8x7b": 46.7, "modelzoo_qwen3_30b_a3b": 30.5,
                      "modelzoo_deepseek_v3": 671.0, "ex_gpt3_175b_v0.17.1": 175.0}


@pytest.mark.parametrize("name", sorted(PUBLISHED_BILLIONS))
def test_planned_sizes_of_public_models_are_their_published_sizes(name):
    config = load_real_config(name)
    tool = plan_tool()
    with launch_environment(config.world_size, config.env):
        try:
            plan = tool.plan(config.argv, nodes=1, gpus_per_node=config.world_size)
        except tool.PlanError as err:  # refused by this Megatron-LM release (the equivalence test checks why)
            assert config.expect[megatron_release()].startswith("megatron-lm"), err
            pytest.skip(f"Megatron-LM {megatron_release()} refuses {name}")
    assert plan["total_params"] / 1e9 == pytest.approx(PUBLISHED_BILLIONS[name], rel=0.005)
    if name == "modelzoo_qwen3_30b_a3b":  # "A3B": 3.3B active
        assert plan["active_params"] / 1e9 == pytest.approx(3.3, rel=0.02)
    if name == "modelzoo_deepseek_v3":  # 37B activated
        assert plan["active_params"] / 1e9 == pytest.approx(37.5, rel=0.02)
