"""Tokenize text into Megatron's indexed dataset (.bin/.idx) with Megatron's own tokenizers and tokenizer flags.

    python tools/preprocess_data.py --input corpus.jsonl --json-keys text --output-prefix data/demo \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model data/demo/tokenizer --append-eod --workers 2

writes data/demo_text_document.bin and .idx (`{PREFIX}_{key}_document`), one per --json-keys key, through
Megatron-Core's `IndexedDatasetBuilder` with `DType.optimal_dtype(vocab_size)` (uint16 below 65500 ids,
else int32); `megatron.core.datasets.indexed_dataset.IndexedDataset` and GPTDataset read them.

Input (--input):
    *.jsonl / *.jsonl.gz   one JSON object per line; each --json-keys field is a string (one sequence) or a
                           list of strings (one sequence each, as Megatron's sentence-split files)
    *.txt                  the whole file is one document
    a directory            its *.txt files (each one document), or its *.jsonl[.gz] files, recursively, in
                           sorted path order

Tokenizer: Megatron-LM's tokenizer flags, parsed by Megatron-LM's own argument group
(`megatron.training.arguments._add_tokenizer_args`, as Megatron-LM's tools/preprocess_data.py) and built by
`megatron.core.tokenizers.utils.build_tokenizer.build_tokenizer(args)`, the call Megatron-LM's training makes
(`megatron.training.global_vars._build_tokenizer`): the same flags as the training command line give the same
token ids, vocabulary and end-of-document id, on the installed megatron-core. For example
    HuggingFaceTokenizer        --tokenizer-model DIR (transformers' AutoTokenizer: tokenizer.json +
                                tokenizer_config.json, its eos_token the eod) or a hub id (downloaded or cached)
    GPT2BPETokenizer            --vocab-file vocab.json --merge-file merges.txt (Megatron's core tokenizer asks
                                the hub's (or the cache's) "gpt2" tokenizer class for them)
    SentencePieceTokenizer, GPTSentencePieceTokenizer, Llama2Tokenizer   --tokenizer-model x.model (eod: eos id)
    TikTokenizer                --tokenizer-model vocab.json [--tiktoken-pattern v2] (needs `tiktoken`)
    NullTokenizer               --vocab-size N: the text is space-separated ids. megatron-core >= 0.18: N ids,
                                the last (N - 1) the eod (--null-tokenizer-eod-id moves it); 0.17: N + 1 ids, eod N
--append-eod appends the tokenizer's eod id to every document (an error when the tokenizer has none).

As Megatron-LM's tool, one document is one `add_document(ids, sequence_lengths)` call, in input order,
tokenized by --workers processes (1: in this process). Unlike it: no --split-sentences / --partitions,
documents that tokenize to nothing are skipped (Megatron-LM writes them as empty documents), ids outside
[0, vocab_size) are an error, and a failed run leaves no partial .bin/.idx behind.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import logging
import multiprocessing
import os
import sys
import time
import traceback
import warnings
from typing import Iterator, Optional, Sequence, Union

import numpy

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
TEXT_SUFFIXES = (".txt",)
LEVEL = "document"  # Megatron-LM names outputs ..._{key}_sentence with --split-sentences, unsupported here


# ---------------------------------------------------------------------------------------------------- tokenizer

# --tokenizer-type values whose --tokenizer-model is a local file (a path that must exist).
MODEL_FILE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer", "TikTokenizer")
# Megatron's vision-language tokenizers: not text-to-ids for a GPT dataset.
NOT_TEXT_TYPES = ("MultimodalTokenizer", "NullMultimodalTokenizer")
# What Megatron-LM's training sets before it builds the tokenizer (the padded vocabulary is not needed here;
# rank 1 keeps `build_tokenizer`'s "padded vocab" log quiet, as Megatron-LM's tools/preprocess_data.py does).
_TRAINING_ONLY_DEFAULTS = {"rank": 1, "make_vocab_size_divisible_by": 128, "tensor_model_parallel_size": 1,
                           "sft_tokenizer_prompt_format": None, "tokenizer_prompt_format": None}


def _megatron_import():
    """megatron.training.arguments and megatron.core's build_tokenizer, without megatron's import-time notices
    (no Transformer Engine / Apex), with `typing.override` on Python < 3.12 (megatron-core 0.19), and without the
    INFO-level root logger that importing megatron.training installs (training.py's `logging.basicConfig`)."""
    from megatron_tst.platform.megatron_lm import prepare_import

    prepare_import()
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.tokenizers.utils import build_tokenizer as build_module
        from megatron.training import arguments
    root.setLevel(level)
    root.handlers[:] = handlers
    return arguments, build_module


def add_tokenizer_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM's own "tokenizer" argument group (`megatron.training.arguments._add_tokenizer_args`) on `parser`:
    every tokenizer flag of the installed Megatron-LM, with its names, defaults and choices."""
    arguments, _ = _megatron_import()
    return arguments._add_tokenizer_args(parser)


def parse_tokenizer_args(argv: Sequence[str]) -> argparse.Namespace:
    """Megatron-LM's tokenizer flags (e.g. ["--tokenizer-type", "NullTokenizer", "--vocab-size", "257"]) parsed by
    Megatron-LM's parser. Raises ValueError on a flag it does not know or a bad value."""
    parser = argparse.ArgumentParser(prog="tokenizer flags", add_help=False, exit_on_error=False)
    add_tokenizer_arguments(parser)
    try:
        namespace, unknown = parser.parse_known_args(list(argv))
    except (argparse.ArgumentError, SystemExit) as error:
        raise ValueError(f"tokenizer flags {' '.join(argv)}: {error}") from None
    if unknown:
        raise ValueError(f"not tokenizer flags of Megatron-LM: {' '.join(unknown)}")
    return namespace


def _as_namespace(tokenizer_args: Union[argparse.Namespace, Sequence[str]]) -> argparse.Namespace:
    if isinstance(tokenizer_args, argparse.Namespace):
        return tokenizer_args
    return parse_tokenizer_args(tokenizer_args)


def _check_tokenizer_flags(args: argparse.Namespace) -> None:
    """What Megatron's build_tokenizer would fail on without saying which flag: said here, before any work."""
    kind = args.tokenizer_type
    if kind is None:
        raise ValueError("--tokenizer-type is required (Megatron-LM's flag, as in training: HuggingFaceTokenizer, "
                         "GPT2BPETokenizer, SentencePieceTokenizer, NullTokenizer, ...)")
    if kind in NOT_TEXT_TYPES:
        raise ValueError(f"--tokenizer-type {kind} is a vision-language tokenizer; this tool writes text datasets")
    model = args.tokenizer_model
    if kind in MODEL_FILE_TYPES + ("HuggingFaceTokenizer", "SFTTokenizer") and not model:
        raise ValueError(f"--tokenizer-type {kind} needs --tokenizer-model (as in training)")
    if kind in MODEL_FILE_TYPES and not os.path.isfile(model):
        raise FileNotFoundError(f"--tokenizer-model {model!r}: no such file ({kind} loads a model file)")
    if kind == "HuggingFaceTokenizer":
        if os.path.isfile(model):
            raise ValueError(
                f"--tokenizer-model {model!r} is a file: HuggingFaceTokenizer loads with transformers' "
                f"AutoTokenizer.from_pretrained, which takes a tokenizer directory (tokenizer.json and "
                f"tokenizer_config.json, saved by save_pretrained) or a hub id; give "
                f"{os.path.dirname(model) or '.'!r} if it holds both")
        looks_local = (os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") > 1
                       or model.endswith(".json"))
        if looks_local and not os.path.isdir(os.path.expanduser(model)):
            raise FileNotFoundError(f"--tokenizer-model {model!r}: no such tokenizer directory")
    for flag, path in (("--vocab-file", args.vocab_file), ("--merge-file", args.merge_file)):
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"{flag} {path!r}: no such file")
    if kind == "NullTokenizer" and not args.vocab_size:
        raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size (the number of token ids, as in "
                         "training; the text is space-separated ids)")


def _hint(kind: str, error: Exception) -> str:
    text = str(error)
    if "must be both be from memory or both filenames" in text:
        return (" (megatron-core 0.17's GPT2BPETokenizer hands --merge-file to transformers under a misspelt "
                "keyword, so the merges are looked up in the hub's 'gpt2' repository instead; use "
                "megatron-core >= 0.19 for your own merges file)")
    if "couldn't connect" in text.lower() or "offline" in text.lower() or "LocalEntryNotFound" in text:
        if kind == "GPT2BPETokenizer":
            return (" (Megatron's GPT2BPETokenizer loads the tokenizer class of the hub's 'gpt2' repository even "
                    "with --vocab-file/--merge-file: it needs network access or that repository in the Hugging "
                    "Face cache)")
        return " (a hub id needs network access or the Hugging Face cache; a local directory does not)"
    if isinstance(error, ModuleNotFoundError):
        return f" (install {error.name})"
    return ""


def build_tokenizer(tokenizer_args: Union[argparse.Namespace, Sequence[str]]):
    """Megatron's tokenizer for Megatron-LM's tokenizer flags: `megatron.core.tokenizers.utils.build_tokenizer.
    build_tokenizer(args)`, the call of Megatron-LM's training (`global_vars._build_tokenizer`).

    Args:
        tokenizer_args: `parse_tokenizer_args`' namespace, or the flags themselves.

    Returns:
        Megatron's tokenizer (`tokenize(text) -> list[int]`, `detokenize`, `vocab_size`, `eod`).

    Raises:
        ValueError: a missing or contradictory flag, or a tokenizer Megatron cannot build (its message, with a
            hint where the cause is known).
        FileNotFoundError: a tokenizer file or directory that does not exist.
    """
    args = copy.copy(_as_namespace(tokenizer_args))
    _check_tokenizer_flags(args)
    for name, value in _TRAINING_ONLY_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, value)
    _, build_module = _megatron_import()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = build_module.build_tokenizer(args)
    except Exception as error:  # Megatron's and transformers' errors: one line with the cause
        message = " ".join(str(error).split())
        if not message:  # a bare assert: where it failed
            frame = traceback.extract_tb(error.__traceback__)[-1]
            message = (f"{type(error).__name__} at {frame.filename.split('site-packages/')[-1]}:{frame.lineno} "
                       f"({(frame.line or '').strip()})")
        raise ValueError(f"--tokenizer-type {args.tokenizer_type}: Megatron cannot build the tokenizer: {message}"
                         f"{_hint(args.tokenizer_type, error)}") from None
    if "transformers" in sys.modules:  # "sequence longer than the model's maximum": not a concern of a dataset
        sys.modules["transformers"].logging.set_verbosity_error()
    vocab_size = tokenizer.vocab_size
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"--tokenizer-type {args.tokenizer_type}: vocabulary size {vocab_size!r}")
    return tokenizer


def describe_tokenizer(args: argparse.Namespace, tokenizer) -> str:
    """One line: the tokenizer's type, its files, vocabulary size and eod id."""
    files = [f"{flag} {value}" for flag, value in (("--tokenizer-model", args.tokenizer_model),
                                                   ("--vocab-file", args.vocab_file),
                                                   ("--merge-file", args.merge_file)) if value]
    return (f"{args.tokenizer_type}{' (' + ', '.join(files) + ')' if files else ''}, vocab_size "
            f"{tokenizer.vocab_size}, eod {_eod(tokenizer)}")


def _eod(tokenizer) -> Optional[int]:
    """The tokenizer's end-of-document id, or None when it has none."""
    try:
        eod = tokenizer.eod
    except (AttributeError, NotImplementedError, KeyError, TypeError, ValueError):
        return None
    return None if eod is None else int(eod)


# ---------------------------------------------------------------------------------------------------- input



def discover_inputs(path: str) -> tuple[str, list[str]]:
    """The input kind ("jsonl" or "txt") and its files, in processing order.

    Raises:
        FileNotFoundError: `path` does not exist, or is a directory without .txt / .jsonl files.
        ValueError: an unsupported file type, or a directory mixing .txt and .jsonl files.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"--input {path!r} does not exist")
    if os.path.isfile(path):
        if path.endswith(JSONL_SUFFIXES):
            return "jsonl", [path]
        if path.endswith(TEXT_SUFFIXES):
            return "txt", [path]
        raise ValueError(f"--input {path!r}: expected a .jsonl[.gz] or .txt file, or a directory of them")
    found = {"jsonl": [], "txt": []}
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            if name.endswith(JSONL_SUFFIXES):
                found["jsonl"].append(full)
            elif name.endswith(TEXT_SUFFIXES):
                found["txt"].append(full)
    if found["jsonl"] and found["txt"]:
        raise ValueError(f"--input {path!r} holds both .txt and .jsonl files; give one kind")
    for kind in ("jsonl", "txt"):
        if found[kind]:
            return kind, sorted(found[kind])
    raise FileNotFoundError(f"--input {path!r} is a directory without .txt or .jsonl files")


def output_paths(output_prefix: str, key: str) -> tuple[str, str]:
    """(.bin, .idx) paths for one JSON key, named as Megatron-LM names them."""
    stem = f"{output_prefix}_{key}_{LEVEL}"
    return stem + ".bin", stem + ".idx"


def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def _iter_items(kind: str, files: Sequence[str]) -> Iterator[tuple[str, str]]:
    """(location, payload): a JSON line with its file:line, or a .txt path (read by the worker)."""
    if kind == "txt":
        for path in files:
            yield path, path
        return
    for path in files:
        with _open_text(path) as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    yield f"{path}:{number}", line


def _check_first_record(files: Sequence[str], json_keys: Sequence[str]) -> None:
    """Fail early on a .jsonl whose first record is not JSON or lacks a --json-keys field."""
    for location, line in _iter_items("jsonl", files):
        _fields(location, line, json_keys)
        return
    raise ValueError(f"--input {', '.join(files)}: no JSON records")


def _fields(location: str, line: str, json_keys: Sequence[str]) -> dict:
    try:
        record = json.loads(line)
    except ValueError as error:
        raise ValueError(f"{location}: not valid JSON ({error})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{location}: expected a JSON object, got {type(record).__name__}")
    fields = {}
    for key in json_keys:
        if key not in record:
            raise ValueError(f"{location}: no field {key!r} (--json-keys {' '.join(json_keys)})")
        value = record[key]
        if isinstance(value, list) and all(isinstance(part, str) for part in value):
            fields[key] = value
        elif isinstance(value, str):
            fields[key] = [value]
        else:
            raise ValueError(f"{location}: field {key!r} must be a string or a list of strings")
    return fields


class _Encoder:
    """Turns one input item into per-key token arrays; one instance per worker process."""

    def __init__(self, tokenizer, kind: str, json_keys: Sequence[str], append_eod: bool, dtype):
        self.tokenizer = tokenizer
        self.vocab_size = int(tokenizer.vocab_size)
        self.eod = _eod(tokenizer)
        self.kind = kind
        self.json_keys = list(json_keys)
        self.append_eod = append_eod
        self.dtype = dtype

    def encode(self, item: tuple[str, str]) -> tuple[dict, int]:
        location, payload = item
        if self.kind == "txt":
            try:
                with open(payload, "r", encoding="utf-8-sig") as text_file:
                    text = text_file.read()
            except UnicodeDecodeError as error:
                raise ValueError(f"{location}: not UTF-8 text ({error})") from None
            fields = {self.json_keys[0]: [text]}
            nbytes = len(text.encode("utf-8"))
        else:
            fields = _fields(location, payload, self.json_keys)
            nbytes = len(payload.encode("utf-8"))
        encoded = {}
        for key, parts in fields.items():
            ids: list[int] = []
            lengths: list[int] = []
            for part in parts:
                if not part:
                    continue
                try:
                    part_ids = list(self.tokenizer.tokenize(part))
                except (ValueError, TypeError) as error:
                    raise ValueError(f"{location}: field {key!r} cannot be tokenized ({error})") from None
                if part_ids:
                    ids.extend(part_ids)
                    lengths.append(len(part_ids))
            if ids and self.append_eod:
                ids.append(self.eod)
                lengths[-1] += 1
            array = numpy.asarray(ids, dtype=numpy.int64)
            if array.size and (array.min() < 0 or array.max() >= self.vocab_size):
                raise ValueError(
                    f"{location}: field {key!r} has token ids outside [0, {self.vocab_size}) "
                    f"(min {array.min()}, max {array.max()})"
                )
            encoded[key] = (array.astype(self.dtype), lengths)
        return encoded, nbytes


_WORKER_ENCODER: Optional[_Encoder] = None


def _init_worker(tokenizer_args: argparse.Namespace, kind: str, json_keys: list, append_eod: bool, dtype) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = _Encoder(build_tokenizer(tokenizer_args), kind, json_keys, append_eod, dtype)


def _encode_in_worker(item: tuple[str, str]) -> tuple[dict, int]:
    return _WORKER_ENCODER.encode(item)


def _pool_context():
    # fork: workers start at once without re-importing torch / Megatron; spawn where fork is unavailable.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None)


def preprocess(
    input: str,
    output_prefix: str,
    tokenizer_args: Union[argparse.Namespace, Sequence[str]],
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    log_interval: int = 1000,
    log=None,
) -> dict:
    """Tokenize `input` into `{output_prefix}_{key}_document.bin/.idx` for each key of `json_keys`.

    Args:
        input: a .jsonl[.gz] or .txt file, or a directory of either (see the module docstring).
        output_prefix: path prefix of the outputs; its directory is created if missing.
        tokenizer_args: Megatron-LM's tokenizer flags, as `parse_tokenizer_args`' namespace or as the flags
            (e.g. ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "data/demo/tokenizer"]).
        json_keys: the JSON fields to tokenize (.txt input: exactly one key, which names the output).
        append_eod: append the tokenizer's eod id to each non-empty document.
        workers: tokenizing processes; 1 tokenizes in this process.
        log_interval: report progress every this many documents (with `log`).
        log: a print-like callable for progress lines, or None for silence.

    Returns:
        A summary dict: input kind and files, tokenizer, dtype, per-key documents / tokens / skipped empty
        documents / output paths, bytes read and seconds.

    Raises:
        FileNotFoundError, ValueError: bad input, tokenizer flags, or arguments; raised before any output is
        written when detectable up front (missing input, tokenizer problems, --append-eod without an eod id,
        a bad first JSON record), else on the offending record, with its file:line, after removing the partial
        outputs.
    """
    start = time.time()
    json_keys = list(json_keys)
    if not json_keys or len(set(json_keys)) != len(json_keys):
        raise ValueError(f"--json-keys must name distinct fields, got {json_keys}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    kind, files = discover_inputs(input)
    if kind == "txt" and len(json_keys) != 1:
        raise ValueError("--input of .txt files is one text per document: give exactly one --json-keys key")
    tokenizer_args = _as_namespace(tokenizer_args)
    tokenizer = build_tokenizer(tokenizer_args)
    eod = _eod(tokenizer)
    if append_eod and (eod is None or not 0 <= eod < tokenizer.vocab_size):
        raise ValueError(f"--append-eod: the tokenizer has no end-of-document id in [0, {tokenizer.vocab_size}) "
                         f"(eod {eod}; a HuggingFaceTokenizer's is the eos_token of its tokenizer_config.json)")
    if kind == "jsonl":
        _check_first_record(files, json_keys)

    with warnings.catch_warnings():  # megatron.core's import-time notices about Transformer Engine / Apex
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    paths = {key: output_paths(output_prefix, key) for key in json_keys}
    stats = {key: {"documents": 0, "tokens": 0, "skipped_empty": 0} for key in json_keys}
    builders = {key: IndexedDatasetBuilder(paths[key][0], dtype=dtype) for key in json_keys}
    items = _iter_items(kind, files)
    total_bytes = 0
    count = 0
    pool = None
    finished = False
    try:
        if workers == 1:
            encoder = _Encoder(tokenizer, kind, json_keys, append_eod, dtype)
            encoded_docs = map(encoder.encode, items)
        else:
            pool = _pool_context().Pool(
                workers, initializer=_init_worker, initargs=(tokenizer_args, kind, json_keys, append_eod, dtype)
            )
            encoded_docs = pool.imap(_encode_in_worker, items, chunksize=16)
        for count, (encoded, nbytes) in enumerate(encoded_docs, start=1):
            total_bytes += nbytes
            for key, (array, lengths) in encoded.items():
                if array.size == 0:
                    stats[key]["skipped_empty"] += 1
                    continue
                builders[key].add_document(array, lengths)
                stats[key]["documents"] += 1
                stats[key]["tokens"] += int(array.size)
            if log is not None and log_interval and count % log_interval == 0:
                elapsed = max(time.time() - start, 1e-9)
                log(f"processed {count} documents ({count / elapsed:.1f} docs/s, "
                    f"{total_bytes / elapsed / 2**20:.2f} MB/s)")
        for key in json_keys:
            if stats[key]["documents"] == 0:
                raise ValueError(f"--input {input!r}: no non-empty documents for field {key!r}")
        for key in json_keys:
            builders[key].finalize(paths[key][1])
        finished = True
    finally:
        if pool is not None:
            if finished:
                pool.close()
            else:
                pool.terminate()
            pool.join()
        if not finished:
            for key in json_keys:
                builders[key].data_file.close()
                for path in paths[key]:
                    if os.path.exists(path):
                        os.remove(path)

    return {
        "input": input,
        "kind": kind,
        "files": len(files),
        "records": count,
        "bytes": total_bytes,
        "tokenizer": describe_tokenizer(tokenizer_args, tokenizer),
        "tokenizer_type": tokenizer_args.tokenizer_type,
        "vocab_size": int(tokenizer.vocab_size),
        "eod": eod,
        "append_eod": append_eod,
        "dtype": numpy.dtype(dtype).name,
        "keys": {key: dict(stats[key], bin=paths[key][0], idx=paths[key][1]) for key in json_keys},
        "seconds": time.time() - start,
    }


def format_summary(summary: dict) -> str:
    """Human-readable lines for a `preprocess` summary."""
    lines = [
        f"input: {summary['input']} ({summary['files']} {summary['kind']} file(s), {summary['records']} records, "
        f"{summary['bytes'] / 2**20:.2f} MiB)",
        f"tokenizer: {summary['tokenizer']}; append eod: {summary['append_eod']}; dtype {summary['dtype']}",
    ]
    for key, info in summary["keys"].items():
        skipped = f", {info['skipped_empty']} empty skipped" if info["skipped_empty"] else ""
        lines.append(f"[{key}] {info['documents']} documents, {info['tokens']} tokens{skipped}")
        lines.append(f"[{key}] wrote {info['bin']}")
        lines.append(f"[{key}] wrote {info['idx']}")
    lines.append(f"done in {summary['seconds']:.1f} s")
    return "\n".join(lines)


def get_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line: this tool's flags (Megatron-LM's tool's names) and Megatron-LM's tokenizer group."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True, help=".jsonl[.gz] or .txt file, or a directory of them")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="space-separated JSON fields to tokenize (default: text)")
    group = parser.add_argument_group("tokenization process")
    group.add_argument("--append-eod", action="store_true", help="append the eod token to each document")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True,
                       help="outputs are {PREFIX}_{key}_document.bin/.idx")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizing processes (1: in-process)")
    group.add_argument("--log-interval", type=int, default=1000, help="progress every N documents")
    add_tokenizer_arguments(parser)  # Megatron-LM's "tokenizer" group: --tokenizer-type, --tokenizer-model, ...
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (1 on a bad input or tokenizer, with a message)."""
    args = get_args(argv)
    try:
        summary = preprocess(
            input=args.input,
            output_prefix=args.output_prefix,
            tokenizer_args=args,
            json_keys=args.json_keys,
            append_eod=args.append_eod,
            workers=args.workers,
            log_interval=args.log_interval,
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"preprocess_data.py: error: {error}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
