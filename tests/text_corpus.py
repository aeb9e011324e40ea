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
