"""Tokenize text into Megatron's indexed dataset (.bin/.idx), with Megatron-LM's tools/preprocess_data.py flags.

    python tools/preprocess_data.py --input corpus.jsonl --json-keys text --output-prefix data/demo \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model data/tokenizer.json --append-eod --workers 2

writes data/demo_text_document.bin and .idx (`{PREFIX}_{key}_document`), one per --json-keys key, through
Megatron-Core's `IndexedDatasetBuilder` with `DType.optimal_dtype(vocab_size)` (uint16 below 65500 ids,
else int32); `megatron.core.datasets.indexed_dataset.IndexedDataset` and GPTDataset read them.

Input (--input):
    *.jsonl / *.jsonl.gz   one JSON object per line; each --json-keys field is a string (one sequence) or a
                           list of strings (one sequence each, as Megatron's sentence-split files)
    *.txt                  the whole file is one document
    a directory            its *.txt files (each one document), or its *.jsonl[.gz] files, recursively, in
                           sorted path order

Tokenizers (--tokenizer-type): HuggingFaceTokenizer (--tokenizer-model tokenizer.json or its directory),
SentencePieceTokenizer (--tokenizer-model x.model), NullTokenizer (--vocab-size N; text is space-separated
ids); see megatron_tst/training/tokenizer.py. --append-eod appends the tokenizer's eod id to every document.

As Megatron-LM's tool, one document is one `add_document(ids, sequence_lengths)` call, in input order,
tokenized by --workers processes (1: in this process). Unlike it: no --split-sentences / --partitions,
documents that tokenize to nothing are skipped (Megatron-LM writes them as empty documents), ids outside
[0, vocab_size) are an error, and a failed run leaves no partial .bin/.idx behind.
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import os
import sys
import time
import warnings
from typing import Iterator, Optional, Sequence

import numpy

from megatron_tst.training.tokenizer import TOKENIZER_TYPES, TextTokenizer, build_tokenizer

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
TEXT_SUFFIXES = (".txt",)
LEVEL = "document"  # Megatron-LM names outputs ..._{key}_sentence with --split-sentences, unsupported here


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

    def __init__(self, tokenizer: TextTokenizer, kind: str, json_keys: Sequence[str], append_eod: bool, dtype):
        self.tokenizer = tokenizer
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
                    part_ids = self.tokenizer.tokenize(part)
                except ValueError as error:
                    raise ValueError(f"{location}: field {key!r} cannot be tokenized ({error})") from None
                if part_ids:
                    ids.extend(part_ids)
                    lengths.append(len(part_ids))
            if ids and self.append_eod:
                ids.append(self.tokenizer.eod)
                lengths[-1] += 1
            array = numpy.asarray(ids, dtype=numpy.int64)
            if array.size and (array.min() < 0 or array.max() >= self.tokenizer.vocab_size):
                raise ValueError(
                    f"{location}: field {key!r} has token ids outside [0, {self.tokenizer.vocab_size}) "
                    f"(min {array.min()}, max {array.max()})"
                )
            encoded[key] = (array.astype(self.dtype), lengths)
        return encoded, nbytes


_WORKER_ENCODER: Optional[_Encoder] = None


def _init_worker(tokenizer_args: tuple, kind: str, json_keys: list, append_eod: bool, dtype) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = _Encoder(build_tokenizer(*tokenizer_args), kind, json_keys, append_eod, dtype)


def _encode_in_worker(item: tuple[str, str]) -> tuple[dict, int]:
    return _WORKER_ENCODER.encode(item)


def _pool_context():
    # fork: workers start at once without re-importing torch / Megatron-Core; spawn where fork is unavailable.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None)


def preprocess(
    input: str,
    output_prefix: str,
    tokenizer_type: str,
    tokenizer_model: Optional[str] = None,
    vocab_size: Optional[int] = None,
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
        tokenizer_type, tokenizer_model, vocab_size: as `megatron_tst.training.tokenizer.build_tokenizer`.
        json_keys: the JSON fields to tokenize (.txt input: exactly one key, which names the output).
        append_eod: append the tokenizer's eod id to each non-empty document.
        workers: tokenizing processes; 1 tokenizes in this process.
        log_interval: report progress every this many documents (with `log`).
        log: a print-like callable for progress lines, or None for silence.

    Returns:
        A summary dict: input kind and files, tokenizer, dtype, per-key documents / tokens / skipped empty
        documents / output paths, bytes read and seconds.

    Raises:
        FileNotFoundError, ValueError: bad input, tokenizer, or arguments; raised before any output is
        written when detectable up front (missing input, tokenizer problems, a bad first JSON record),
        else on the offending record, with its file:line, after removing the partial outputs.
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
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model, vocab_size)
    if kind == "jsonl":
        _check_first_record(files, json_keys)

    with warnings.catch_warnings():  # megatron.core's import-time notices about Transformer Engine / Apex
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed")
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
            tokenizer_args = (tokenizer_type, tokenizer_model, vocab_size)
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
        "tokenizer": repr(tokenizer),
        "vocab_size": tokenizer.vocab_size,
        "eod": tokenizer.eod,
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
    """Parse the command line (Megatron-LM's flag names)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    group.add_argument("--tokenizer-model", default=None,
                       help="tokenizer.json (or its directory) / sentencepiece .model")
    group.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer's vocabulary size")
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
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (1 on a bad input or tokenizer, with a message)."""
    args = get_args(argv)
    try:
        summary = preprocess(
            input=args.input,
            output_prefix=args.output_prefix,
            tokenizer_type=args.tokenizer_type,
            tokenizer_model=args.tokenizer_model,
            vocab_size=args.vocab_size,
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
