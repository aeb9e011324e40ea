"""An offline downstream task from the demo corpus's held-out split: word-order cloze, four candidates, one real.

    python tools/build_cloze_task.py [--data-dir data/demo] [--items 500] [--seed 1234]

Megatron's `--split 949,50,1` (the demo's, tools/demo.sh and tools/replicate.py) trains on the corpus's first
round(0.949 n) documents; the rest (validation and test, never trained on) are held out. From those documents
each item takes a passage (about --context-chars characters of whole lines, then the first words of one more line,
up to a space near its middle) and four candidate endings of that line: the real one and three other orders of its
words (each word with its leading space and punctuation), in a random order. The candidates hold the same words, so
word frequencies and lengths tell them nothing: a model prefers the real ending only as far as it has learned how
words follow one another (and the passage); one that has not scores 1/4 on average. The demo's small models are far
from the level where real next-line or commonsense tasks rise above chance; this one measures the same kind of
knowledge at their level. Lines are verse or prose lines of at least 20 characters (no speaker tags such as
"DUKE.", no blank lines) whose ending has at least 4 words.

Writes DIR/cloze/ (DIR = --data-dir):
    tst_demo_cloze.jsonl   {"context", "choices" [4], "label", "source"} per item
    tst_demo_cloze.yaml    the lm-eval task `tst_demo_cloze` (multiple choice; metrics acc and acc_norm, with
                           lm-eval's standard errors) reading that file with `datasets`' json loader, offline
Register it with lm-eval's `--include_path DIR/cloze` (tools/evaluate.py does). Deterministic for a --seed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from typing import Optional, Sequence

TASK = "tst_demo_cloze"
MIN_CHARS = 20
TRAIN_SHARE = 0.949  # --split 949,50,1: Megatron's first split takes round(0.949 n) documents

# lm-eval task config (lm_eval.api.task.TaskConfig fields); the data file's path is filled in.
TASK_YAML = """\
# Built by tools/build_cloze_task.py from the demo corpus's held-out documents (--split 949,50,1: validation and
# test). Word-order cloze: a passage ending inside a line and four orders of that line's remaining words, one real;
# chance is 0.25.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def held_out_documents(corpus_path: str, prefix: Optional[str] = None) -> list:
    """The corpus documents ({"text", "source", ...}) that Megatron's --split 949,50,1 keeps out of training.

    The corpus (corpus.jsonl) holds one line per document of the indexed dataset, in its order; with `prefix`
    (the indexed dataset) the counts are checked. Raises ValueError when they differ."""
    with open(corpus_path) as f:
        documents = [json.loads(line) for line in f if line.strip()]
    if prefix is not None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        indexed = len(IndexedDataset(prefix, mmap=True).document_indices) - 1
        if indexed != len(documents):
            raise ValueError(f"{corpus_path} holds {len(documents)} documents, {prefix}.idx {indexed}: rebuild the "
                             "demo data (python tools/build_demo_data.py --force)")
    return documents[int(round(TRAIN_SHARE * len(documents))):]


def _is_text_line(line: str) -> bool:
    stripped = line.strip()
    return len(stripped) >= MIN_CHARS and not (stripped.isupper() and stripped.endswith("."))


def split_line(line: str) -> tuple:
    """(first words, ending) of a line, cut at the space nearest its middle; the ending keeps its leading space."""
    middle = len(line) // 2
    spaces = [i for i, c in enumerate(line) if c == " " and 0 < i < len(line) - 1 and line[i - 1] != " "]
    if not spaces:
        return line, ""
    cut = min(spaces, key=lambda i: abs(i - middle))
    return line[:cut], line[cut:].rstrip()


def build_items(documents: Sequence[dict], items: int, seed: int, context_chars: int = 400) -> list:
    """Up to `items` cloze items from `documents` (see the module docstring), deterministic for `seed`: dicts
    {"context": str, "choices": [4 str], "label": index of the real ending, "source": the work}."""
    rng = random.Random(seed)
    lines = [[line.rstrip() for line in doc["text"].split("\n")] for doc in documents]
    by_document = [[i for i, line in enumerate(doc) if _is_text_line(line)] for doc in lines]
    pool = [(d, i) for d, indices in enumerate(by_document) for i in indices]
    candidates = [(d, i) for d, i in pool if len(set(split_line(lines[d][i])[1].split())) >= 4
                  and sum(len(x) + 1 for x in lines[d][:i]) >= context_chars]
    rng.shuffle(candidates)
    out = []
    for d, i in candidates:
        if len(out) == items:
            break
        first, real = split_line(lines[d][i])
        words = [" " + word for word in real.split()]
        others = set()
        while len(others) < 3:
            order = "".join(rng.sample(words, len(words)))
            if order != real:
                others.add(order)
        choices = sorted(others) + [real]
        rng.shuffle(choices)
        start = i
        while start > 0 and sum(len(x) + 1 for x in lines[d][start:i]) < context_chars:
            start -= 1
        context = "\n".join(lines[d][start:i]) + "\n" + first
        out.append({"context": context, "choices": choices, "label": choices.index(real),
                    "source": documents[d].get("source", "")})
    return out


def build(data_dir: str, items: int = 500, seed: int = 1234, context_chars: int = 400) -> str:
    """Write the task into DATA_DIR/cloze (module docstring); returns that directory (lm-eval's --include_path).
    Raises FileNotFoundError without the demo data (tools/build_demo_data.py), ValueError when it is
    inconsistent or holds too few held-out lines for `items`."""
    corpus = os.path.join(data_dir, "corpus.jsonl")
    if not os.path.exists(corpus):
        raise FileNotFoundError(f"{corpus} not found: build the demo data first (python tools/build_demo_data.py "
                                f"--out {data_dir})")
    prefix = os.path.join(data_dir, "demo_text_document")
    documents = held_out_documents(corpus, prefix if os.path.exists(prefix + ".idx") else None)
    built = build_items(documents, items, seed, context_chars)
    if len(built) < items:
        raise ValueError(f"the held-out documents of {corpus} give {len(built)} items, fewer than --items {items}")
    out = os.path.join(data_dir, "cloze")
    os.makedirs(out, exist_ok=True)
    data_file = os.path.abspath(os.path.join(out, f"{TASK}.jsonl"))
    with open(data_file, "w") as f:
        f.writelines(json.dumps(item) + "\n" for item in built)
    with open(os.path.join(out, f"{TASK}.yaml"), "w") as f:
        f.write(TASK_YAML.format(task=TASK, data_file=json.dumps(data_file)))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data/demo", help="the demo data (tools/build_demo_data.py)")
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--context-chars", type=int, default=400, help="about this many characters of passage")
    args = parser.parse_args(argv)
    try:
        out = build(args.data_dir, args.items, args.seed, args.context_chars)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{TASK}: {args.items} items in {out} (lm-eval --include_path {out} --tasks {TASK})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
