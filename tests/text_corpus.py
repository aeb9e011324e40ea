"""Real English text available offline: the docstrings of Python's standard library, as byte tokens.

Used by end-to-end tests that need text a model can learn (loss must fall), without a network or a trained
tokenizer: token id = byte value (0..255), end-of-document = 256, so `--tokenizer-type NullTokenizer
--vocab-size 257` reads it (Megatron-LM's NullTokenizer: the last id is the end-of-document token).
"""

import ast
import os
import sysconfig

import numpy as np

VOCAB_SIZE = 257
EOD = 256
STDLIB_MODULES = ("argparse", "collections/__init__", "difflib", "email/message", "inspect", "json/__init__",
                  "logging/__init__", "pathlib", "pickle", "shutil", "statistics", "subprocess", "tarfile",
                  "textwrap", "threading", "typing", "unittest/case", "urllib/request", "zipfile", "decimal",
                  "calendar", "datetime", "functools", "http/client", "imaplib", "optparse", "pydoc", "random")


def docstrings(max_documents: int = 5000) -> list:
    """Docstrings (>= 200 characters) of the listed stdlib modules, in a fixed order."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for name in STDLIB_MODULES:
        path = os.path.join(root, name + ".py")
        if not os.path.exists(path):
            continue
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                text = ast.get_docstring(node)
                if text and len(text) >= 200:
                    out.append(text)
    return out[:max_documents]


def build_byte_corpus(directory: str, name: str = "stdlib_text") -> str:
    """Write <directory>/<name>.bin/.idx (Megatron indexed dataset); returns the prefix."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = os.path.join(directory, name)
    if os.path.exists(prefix + ".idx"):
        return prefix
    os.makedirs(directory, exist_ok=True)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for text in docstrings():
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)
        builder.add_document(np.append(ids, EOD), [len(ids) + 1])
    builder.finalize(prefix + ".idx")
    return prefix


def gpt2_bpe_files(directory, texts, vocab_size: int, end_of_text: str = "<|endoftext|>"):
    """GPT-2-style vocab.json / merges.txt trained offline on `texts`, and a Hugging Face cache holding the hub
    repository 'gpt2' as far as Megatron's GPT2BPETokenizer reads it (config.json and tokenizer_config.json: the
    tokenizer class; no vocabulary): Megatron-Core builds it as AutoTokenizer.from_pretrained('gpt2',
    vocab_file=..., merges_file=...), which looks the class up in the hub even with local files.
    `directory`: a pathlib.Path. Returns (vocab file, merges file, HF_HOME, vocabulary size)."""
    import json

    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=[end_of_text], show_progress=False)
    bpe.save_model(str(directory))
    snapshot = directory / "hf" / "hub" / "models--gpt2" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (snapshot / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer",
                                                                "model_max_length": 1024}))
    return str(directory / "vocab.json"), str(directory / "merges.txt"), str(directory / "hf"), bpe.get_vocab_size()


def megatron_gpt2_ignores_merge_file() -> bool:
    """megatron-core 0.17's HuggingFaceTokenizer passes --merge-file as `merge_files=` (misspelt; fixed in 0.19): its
    GPT2BPETokenizer cannot load local vocab/merges files without the hub's."""
    import inspect

    from megatron.core.tokenizers.text.libraries import huggingface_tokenizer

    return "merge_files=" in inspect.getsource(huggingface_tokenizer.HuggingFaceTokenizer.__init__)
