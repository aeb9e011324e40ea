"""Regenerate megatron_tst/training/megatron_lm_flags.json: every Megatron-LM flag and how many values it takes.

    git clone https://github.com/NVIDIA/Megatron-LM && git -C Megatron-LM checkout core_v0.19.0
    PYTHONPATH=Megatron-LM python tools/extract_megatron_lm_flags.py --tag core_v0.19.0 \
        > megatron_tst/training/megatron_lm_flags.json

The trainer accepts a Megatron-LM `pretrain_gpt.py` command line unchanged; to skip the flags that do not
apply here without misreading their values it must know each flag's arity. This script builds Megatron-LM's
own parser (all `_add_*_args` groups of megatron/training/arguments.py) and records, per option string,
0 (a switch), 1 (one value) or "+" (a list). Imports that need CUDA-only packages are replaced by inert
modules, since only the parser is wanted; Megatron-LM >= 0.19 needs `typing.override` (Python 3.12),
supplied here for older Pythons.
"""

import argparse
import importlib.abc
import importlib.machinery
import json
import sys
import types
import typing

STUBBED = (
    "megatron.core.transformer.moe.ops", "transformer_engine", "apex", "flash_attn", "nvidia_resiliency_ext",
    "einops", "tensorstore", "nvtx", "multistorageclient", "opentelemetry", "mamba_ssm", "causal_conv1d", "fla",
    "grouped_gemm", "flashinfer", "wandb", "transformers", "tiktoken", "modelopt", "emerging_optimizers", "av",
    "onnxscript", "fastapi", "datasets", "wget", "nv_one_logger", "one_logger_utils", "flask", "flask_restful",
    "deep_ep", "nvshmem", "cuda", "pynvml", "zarr", "tqdm",
)


class _Inert(types.ModuleType):
    """A module (and anything reached from it) that does nothing."""

    def __getattr__(self, name):
        if name == "__version__":
            return "99.0.0"
        if name.startswith("__"):
            raise AttributeError(name)
        module = _Inert(f"{self.__name__}.{name}")
        module.__path__ = []
        return module

    def __call__(self, *args, **kwargs):
        return _Inert("call")

    def __iter__(self):
        return iter(())

    def __mro_entries__(self, bases):
        return (object,)


class _InertFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if any(name == prefix or name.startswith(prefix + ".") for prefix in STUBBED):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _Inert(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def arity(action) -> object:
    if action.nargs == 0:
        return 0
    if action.nargs in (None, 1):
        return 1
    if action.nargs in ("+", "*", "?"):
        return action.nargs
    return int(action.nargs)


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--tag", required=True, help="the Megatron-LM version read, recorded in the output")
    tag = cli.parse_args().tag

    typing.override = getattr(typing, "override", lambda f: f)
    sys.meta_path.insert(0, _InertFinder())
    from megatron.training import arguments

    parser = argparse.ArgumentParser(allow_abbrev=False, conflict_handler="resolve")
    for name in sorted(dir(arguments)):
        if name.startswith("_add_") and name.endswith("_args"):
            parser = getattr(arguments, name)(parser) or parser
    table = {opt: arity(action) for action in parser._actions for opt in action.option_strings
             if opt.startswith("--") and opt != "--help"}
    source = f"Megatron-LM {tag} megatron/training/arguments.py (parser built by tools/extract_megatron_lm_flags.py)"
    json.dump({"source": source, "arity": dict(sorted(table.items()))}, sys.stdout, indent=0)


if __name__ == "__main__":
    main()
