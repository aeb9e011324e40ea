"""lm-evaluation-harness's Megatron-LM backend (`lm_eval --model megatron_lm`, lm-eval 0.4.13) on a machine
without CUDA: lm-eval's own command line, after the stand-ins it needs there.

    torchrun --standalone --nproc-per-node 1 -m megatron_tst.platform.lm_eval run --model megatron_lm ...

On GPUs run `torchrun ... -m lm_eval ...` itself; this module then changes nothing (every stand-in below is a
no-op with CUDA) and `tools/evaluate.py` does not use it.

| stand-in                                   | covers                                                             |
|--------------------------------------------|--------------------------------------------------------------------|
| `cpu.install_loop_stand_ins()`             | Megatron-LM's `initialize_megatron` and the CUDA sites of model    |
|                                            | building and checkpoint loading, as in training (platform/cpu.py)  |
| CPU defaults of Megatron-LM's flags        | the backend parses Megatron-LM's flags with no extra-args provider:|
| (`cpu.cpu_argument_defaults`)              | local layer specs, gloo, no fused kernels (0.18+: through          |
|                                            | `parse_args`; 0.17: through `initialize_megatron`)                 |
| `torch.cuda.current_device() = 0` while    | lm_eval/models/megatron_lm.py `_initialize_megatron`:              |
| the backend initialises                    | `torch.device(f"cuda:{torch.cuda.current_device()}")` (the stand-in|
|                                            | of platform/cpu.py answers a CPU device); its tensors on "cuda:0"  |
|                                            | then land on the CPU through cpu.py's device mode                  |
| allow-listed checkpoint reading            | mcore_compat's safe `.metadata` / common / sharded-object loading, |
|                                            | as in training (`megatron_lm.install`)                             |

The backend passes `--bf16`: on CPU the model runs in bfloat16, as on GPUs. Can go when lm-eval's backend takes
its device from torch (not CUDA) and Megatron-LM's initialisation runs without CUDA.
"""

from __future__ import annotations

import functools
import sys
from typing import Optional, Sequence


def _cpu_defaults(parser):
    """An extra-args provider: Megatron-LM's parser with `cpu.cpu_argument_defaults`."""
    from megatron_tst.platform import cpu

    cpu.cpu_argument_defaults(parser)
    return parser


_installed = False


def install() -> bool:
    """Apply the stand-ins of the module docstring once per process. Returns False (nothing changed) with CUDA."""
    global _installed
    from megatron_tst.platform import cpu, megatron_lm

    if cpu.cuda_available():
        return False
    if _installed:
        return True
    _installed = True
    megatron_lm.prepare_import()
    megatron_lm.install(extra_args_provider=_cpu_defaults)
    cpu.install_loop_stand_ins()
    import inspect

    import megatron.training
    from megatron.training import initialize

    without_cuda = initialize.initialize_megatron  # cpu.py's, which allows no CUDA
    initialize_megatron = without_cuda
    if "extra_args_provider" in inspect.signature(without_cuda).parameters:  # 0.17 parses in there
        @functools.wraps(without_cuda)
        def with_cpu_defaults(*args, **kwargs):
            if kwargs.get("extra_args_provider") is None:
                kwargs["extra_args_provider"] = _cpu_defaults
            return without_cuda(*args, **kwargs)

        initialize.initialize_megatron = initialize_megatron = with_cpu_defaults
    megatron.training.initialize_megatron = initialize_megatron  # the backend imports it from there

    import torch
    from lm_eval.models import megatron_lm as backend

    original = backend.MegatronLMEval._initialize_megatron

    @functools.wraps(original)
    def initialize_with_cuda_index(self, **kwargs):
        current = torch.cuda.current_device
        torch.cuda.current_device = lambda: 0
        try:
            return original(self, **kwargs)
        finally:
            torch.cuda.current_device = current

    backend.MegatronLMEval._initialize_megatron = initialize_with_cuda_index
    return True


def main(argv: Optional[Sequence[str]] = None) -> None:
    """lm-eval's command line (`lm_eval ...`) after `install()`."""
    install()
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
