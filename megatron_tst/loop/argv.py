"""`--recipe NAME` and `--config FILE`: flags placed before the command line's, so that the command line wins.

Precedence: recipe < config file < command line. A config file is a YAML mapping of flag names (without the
leading dashes; `-` or `_`) to values: `true` gives the bare flag, `false`/null leaves it out, a list gives the
flag followed by its items. A recipe (`megatron_tst.recipes`) is a model's Megatron-LM flags with the paper's TST
settings; its WSD decay stays 10 % of --train-iters when the command line changes --train-iters alone. Both
flags stay in the command line (Megatron-LM's parser records them in the checkpoint's args).
"""

from __future__ import annotations

import argparse
import os
from typing import List, Optional, Sequence


def _flags_from_mapping(mapping: dict) -> List[str]:
    argv = []
    for key, value in mapping.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            argv += [flag] + [str(v) for v in value]
        else:
            argv += [flag, str(value)]
    return argv


def _config_file_flags(path: str) -> List[str]:
    try:
        import yaml
    except ImportError as err:
        raise SystemExit("--config needs PyYAML: pip install pyyaml") from err
    if not os.path.isfile(path):
        raise SystemExit(f"--config: no such file: {path}")
    with open(path) as f:
        mapping = yaml.safe_load(f) or {}
    if not isinstance(mapping, dict):
        raise SystemExit(f"--config {path}: expected a mapping of flag names to values")
    return _flags_from_mapping(mapping)


def expand(argv: Sequence[str]) -> List[str]:
    """`argv` with the flags of `--recipe NAME` and `--config FILE` placed before it (the command line wins).

    Raises SystemExit naming the flag for an unknown recipe or an unreadable config file.
    """
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    pre.add_argument("--recipe")
    known, _ = pre.parse_known_args(argv)
    prefix = []
    if known.recipe:
        from megatron_tst.recipes import recipe_flags

        try:
            prefix += recipe_flags(known.recipe)
        except ValueError as err:
            raise SystemExit(f"--recipe: {err}") from None
    recipe_prefix = prefix
    config_prefix = _config_file_flags(known.config) if known.config else []
    prefix = _follow_train_iters(recipe_prefix, config_prefix + list(argv)) + config_prefix
    return _drop_overridden_alternatives(prefix, list(argv)) + list(argv)


def _last_value(argv: Sequence[str], flag: str) -> Optional[str]:
    """The value of the last `flag V` or `flag=V` in argv, else None."""
    value = None
    for i, token in enumerate(argv):
        if token == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif token.startswith(flag + "="):
            value = token.split("=", 1)[1]
    return value


def _follow_train_iters(recipe_argv: List[str], user_argv: List[str]) -> List[str]:
    """A recipe's WSD decay is 10 % of its --train-iters: keep it 10 % of the user's --train-iters.

    Only when the user changes --train-iters without also giving --lr-wsd-decay-iters; otherwise a shorter run
    would decay for (or past) its whole length.
    """
    train_iters = _last_value(user_argv, "--train-iters")
    if (train_iters is None or _last_value(user_argv, "--lr-wsd-decay-iters") is not None
            or _last_value(recipe_argv, "--lr-wsd-decay-iters") is None):
        return recipe_argv
    try:
        decay = str(int(train_iters) // 10)
    except ValueError:
        return recipe_argv  # argparse reports the bad --train-iters
    out = list(recipe_argv)
    out[out.index("--lr-wsd-decay-iters") + 1] = decay
    return out


# Flags that say the same thing two ways: one given later replaces the other given earlier.
_ALTERNATIVES = (("--tst-superposition-ratio", "--tst-superposition-iters"),
                 ("--lr-warmup-iters", "--lr-warmup-fraction"))


def _drop_overridden_alternatives(prefix: List[str], argv: List[str]) -> List[str]:
    """Remove from the recipe/config part the flags whose alternative the command line gives."""
    for group in _ALTERNATIVES:
        if any(_last_value(argv, flag) is not None for flag in group):
            kept, skip = [], False
            for token in prefix:
                if skip:
                    skip = False
                    continue
                if token in group:
                    skip = True  # these flags take one value
                    continue
                kept.append(token)
            prefix = kept
    return prefix
