"""Tokenizers by Megatron-LM's `--tokenizer-type` name, for Megatron-Core's GPTDataset and the data tools.

    tok = build_tokenizer("HuggingFaceTokenizer", "data/tokenizer.json")
    tok = build_tokenizer("SentencePieceTokenizer", "spm.model")
    tok = build_tokenizer("NullTokenizer", vocab_size=1024)       # pre-tokenized data

Every tokenizer is a `TextTokenizer` with what `megatron.core.datasets` (GPTDataset, MegatronDataset) reads,
`vocab_size`, `eod`, `pad` and a JSON-serialisable `unique_identifiers`, and what the data tools call,
`tokenize(text) -> list[int]` and `detokenize(ids) -> str`. Behind it:

* `SentencePieceTokenizer` and `NullTokenizer` are Megatron-Core's own library classes
  (`megatron.core.tokenizers.text.libraries`), unchanged. Their module and class names and constructors
  exist from megatron-core 0.16.1 through 0.19, unlike the `MegatronTokenizer.from_pretrained` metadata
  (the null library is "null" in 0.16.1 and "null-text" in 0.19) and the `build_tokenizer(args)` helper
  (moved from `tokenizers.text.utils` to `tokenizers.utils`), which are therefore not used.
* `HuggingFaceTokenizer` reads a `tokenizer.json` with the `tokenizers` library. Megatron-Core's
  HuggingFace wrapper needs `transformers` (AutoTokenizer), which this project does not install. As that
  wrapper's default (`include_special_tokens=False`), tokenize adds no special tokens (no BOS/EOS from the
  tokenizer's post-processor), detokenize drops them, and vocab_size counts the added tokens.

NullTokenizer semantics follow megatron-core >= 0.18 / Megatron-LM 0.19 (commit c9dfe34 "Enable
NullTokenizer for pretraining", megatron/core/tokenizers/text/libraries/null_tokenizer.py): for
`--vocab-size N`, `vocab_size == N`, `eod == N - 1` (the last id) and `pad == -1`, so the model's padded
vocabulary is `vocab_size_with_padding(N)` (1024 for N = 1024). megatron-core 0.16.1's class instead reports
`vocab_size == N + 1` with `eod == N` (Megatron-LM <= 0.17 padded N = 1024 to 1152); on such versions the
class is built with N - 1, which yields exactly the newer values.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import OrderedDict
from typing import Any, Optional, Sequence

TOKENIZER_TYPES = ("HuggingFaceTokenizer", "SentencePieceTokenizer", "NullTokenizer")

# End-of-text token names tried, in order, for a tokenizer.json without a tokenizer_config.json naming one.
EOD_TOKEN_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")

# The pad id Megatron-Core's datasets fall back to (megatron/core/datasets/megatron_dataset.py
# _PAD_TOKEN_ID): no real token carries it, so no loss is masked as padding.
NO_PAD_ID = -1


def _megatron_text_libraries():
    """megatron.core.tokenizers.text.libraries, without megatron.core's import-time notices about TE / Apex."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed")
        from megatron.core.tokenizers.text import libraries
    return libraries


class TextTokenizer:
    """A tokenizer as GPTDataset and the data tools use it.

    Attributes:
        tokenizer_type: the Megatron-LM `--tokenizer-type` name.
        tokenizer_model: absolute path of the model file, or None (NullTokenizer).
    """

    def __init__(self, tokenizer_type: str, backend: Any, tokenizer_model: Optional[str]) -> None:
        self.tokenizer_type = tokenizer_type
        self.tokenizer_model = tokenizer_model
        self._backend = backend
        # Read once: these are per-sample lookups in the data path.
        self._vocab_size = int(backend.vocab_size)
        self._eod = int(backend.eod)
        pad = getattr(backend, "pad_id", None)
        self._pad = NO_PAD_ID if pad is None else int(pad)
        if not 0 <= self._eod < self._vocab_size:
            raise ValueError(
                f"{tokenizer_type}: end-of-document id {self._eod} is outside the vocabulary "
                f"[0, {self._vocab_size})"
            )

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`; no special tokens are added (the data tools append eod themselves)."""
        return list(self._backend.text_to_ids(text))

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of `ids` (special tokens such as eod are dropped where the backend knows them)."""
        return self._backend.ids_to_text([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        """Number of token ids, before Megatron pads it for the model (`vocab_size_with_padding`)."""
        return self._vocab_size

    @property
    def eod(self) -> int:
        """End-of-document id: appended by `preprocess_data.py --append-eod`, read by GPTDataset."""
        return self._eod

    @property
    def eos(self) -> int:
        """Alias of `eod` (Megatron-Core's datasets check both for collisions with `pad`)."""
        return self._eod

    @property
    def pad(self) -> int:
        """Padding id, -1 unless the tokenizer defines one (GPTDataset masks the loss on it)."""
        return self._pad

    @property
    def unique_identifiers(self) -> "OrderedDict[str, Any]":
        """JSON-serialisable identity, part of Megatron-Core's dataset cache hash."""
        return OrderedDict(
            [
                ("class", f"{type(self).__module__}.{type(self).__qualname__}"),
                ("tokenizer_type", self.tokenizer_type),
                ("tokenizer_model", self.tokenizer_model),
                ("vocab_size", self._vocab_size),
                ("eod", self._eod),
                ("pad", self._pad),
            ]
        )

    def __repr__(self) -> str:
        model = f", model={self.tokenizer_model!r}" if self.tokenizer_model else ""
        return (
            f"{type(self).__name__}({self.tokenizer_type}{model}, vocab_size={self._vocab_size}, "
            f"eod={self._eod}, pad={self._pad})"
        )


class _HuggingFaceJson:
    """A `tokenizer.json` through the `tokenizers` library, with Megatron-Core's library-class interface."""

    def __init__(self, json_path: str) -> None:
        try:
            from tokenizers import Tokenizer
        except ModuleNotFoundError as error:  # pragma: no cover - installed with the "text" extra
            raise ModuleNotFoundError(
                "HuggingFaceTokenizer needs the `tokenizers` package: pip install tokenizers"
            ) from error
        try:
            self._tokenizer = Tokenizer.from_file(json_path)
        except Exception as error:
            raise ValueError(f"HuggingFaceTokenizer: cannot load {json_path}: {error}") from error
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.eod = self._find_eod(json_path)
        self.pad_id = None

    def _find_eod(self, json_path: str) -> int:
        tried = []
        config_eos = _eos_token_from_config(os.path.join(os.path.dirname(json_path), "tokenizer_config.json"))
        for name in ([config_eos] if config_eos else []) + list(EOD_TOKEN_CANDIDATES):
            tried.append(name)
            token_id = self._tokenizer.token_to_id(name)
            if token_id is not None:
                return int(token_id)
        raise ValueError(
            f"HuggingFaceTokenizer: {json_path} has no end-of-text token (tried {', '.join(tried)}); "
            f"add one as a special token when training the tokenizer"
        )

    def text_to_ids(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def ids_to_text(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)


def _eos_token_from_config(config_path: str) -> Optional[str]:
    """The `eos_token` a transformers tokenizer_config.json names, if the file exists and names one."""
    if not os.path.isfile(config_path):
        return None
    try:
        with open(config_path, encoding="utf-8") as config_file:
            eos = json.load(config_file).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) and eos else None


def _resolve_hf_model(tokenizer_model: Optional[str]) -> str:
    if not tokenizer_model:
        raise ValueError(
            "HuggingFaceTokenizer needs --tokenizer-model: a tokenizer.json file or a directory containing one"
        )
    path = os.path.abspath(os.path.expanduser(tokenizer_model))
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"HuggingFaceTokenizer: no tokenizer.json at {tokenizer_model!r} (give the file or its directory)"
        )
    return path


def _build_sentencepiece(tokenizer_model: Optional[str]):
    if not tokenizer_model:
        raise ValueError("SentencePieceTokenizer needs --tokenizer-model: a sentencepiece .model file")
    path = os.path.abspath(os.path.expanduser(tokenizer_model))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SentencePieceTokenizer: no model file at {tokenizer_model!r}")
    try:
        backend = _megatron_text_libraries().SentencePieceTokenizer(path)
    except (ValueError, RuntimeError, OSError) as error:
        raise ValueError(f"SentencePieceTokenizer: cannot load {path}: {error}") from error
    if backend.eod is None or int(backend.eod) < 0:
        raise ValueError(
            f"SentencePieceTokenizer: {path} has no end-of-sentence piece (eos_id < 0); "
            f"train it with eos_id >= 0 (sentencepiece's default is 2)"
        )
    return backend, path


def _build_null(vocab_size: Optional[int]):
    if vocab_size is None:
        raise ValueError("NullTokenizer needs --vocab-size (the number of token ids in the pre-tokenized data)")
    if isinstance(vocab_size, bool) or int(vocab_size) != vocab_size or vocab_size < 1:
        raise ValueError(f"NullTokenizer: --vocab-size must be a positive integer, got {vocab_size!r}")
    null_tokenizer_class = _megatron_text_libraries().NullTokenizer
    from megatron_tst.platform import mcore_compat  # its constructor's meaning changed in megatron-core 0.18

    return mcore_compat.null_tokenizer(null_tokenizer_class, int(vocab_size))


def build_tokenizer(
    tokenizer_type: str, tokenizer_model: Optional[str] = None, vocab_size: Optional[int] = None
) -> TextTokenizer:
    """Build a tokenizer from Megatron-LM's `--tokenizer-type`, `--tokenizer-model` and `--vocab-size`.

    Args:
        tokenizer_type: "HuggingFaceTokenizer" (`tokenizer_model`: a tokenizer.json or a directory holding
            one; eod is the tokenizer_config.json's eos_token if that file is beside it, else the first of
            EOD_TOKEN_CANDIDATES in the vocabulary), "SentencePieceTokenizer" (`tokenizer_model`: a .model
            file; eod is its eos id) or "NullTokenizer" (pre-tokenized data, space-separated ids as text;
            `vocab_size` N gives vocab_size N and eod N - 1, as Megatron-LM 0.19).
        tokenizer_model: the model file or directory; not used by NullTokenizer.
        vocab_size: NullTokenizer's vocabulary size; ignored by the others (their model defines it).

    Returns:
        A TextTokenizer.

    Raises:
        ValueError: unknown type, missing argument, or a model that cannot be used (no eod token).
        FileNotFoundError: the model file does not exist.
    """
    if tokenizer_type == "HuggingFaceTokenizer":
        path = _resolve_hf_model(tokenizer_model)
        return TextTokenizer(tokenizer_type, _HuggingFaceJson(path), path)
    if tokenizer_type == "SentencePieceTokenizer":
        backend, path = _build_sentencepiece(tokenizer_model)
        return TextTokenizer(tokenizer_type, backend, path)
    if tokenizer_type == "NullTokenizer":
        return TextTokenizer(tokenizer_type, _build_null(vocab_size), None)
    raise ValueError(
        f"unknown --tokenizer-type {tokenizer_type!r}; supported: {', '.join(TOKENIZER_TYPES)}"
    )


def vocab_size_with_padding(
    orig_vocab_size: int, make_vocab_size_divisible_by: int = 128, tensor_model_parallel_size: int = 1
) -> int:
    """The model's vocabulary size: `orig_vocab_size` rounded up to a multiple of
    `make_vocab_size_divisible_by * tensor_model_parallel_size`, as Megatron-LM's `_vocab_size_with_padding`
    (`--make-vocab-size-divisible-by`, default 128). E.g. 8192 -> 8192, 1025 -> 1152, 50257 -> 50304."""
    for name, value in (
        ("orig_vocab_size", orig_vocab_size),
        ("make_vocab_size_divisible_by", make_vocab_size_divisible_by),
        ("tensor_model_parallel_size", tensor_model_parallel_size),
    ):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    multiple = int(make_vocab_size_divisible_by) * int(tensor_model_parallel_size)
    return -(-int(orig_vocab_size) // multiple) * multiple
