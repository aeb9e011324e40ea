"""Tokenizers (megatron_tst.training.tokenizer) and tools/preprocess_data.py: small local files, no network."""

import json
import os

import numpy
import preprocess_data  # tools/preprocess_data.py (pytest.ini's pythonpath)
import pytest

from megatron_tst.training.tokenizer import (
    TextTokenizer,
    build_tokenizer,
    vocab_size_with_padding,
)

pytestmark = pytest.mark.unit

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "To be, or not to be: that is the question.",
    "All the world's a stage, and all the men and women merely players.",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "Naïve café owners say “hello” — twice.",
]


def _train_bpe(path, special_tokens, vocab_size=320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(SENTENCES * 4, trainer)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tokenizer.save(str(path))
    return tokenizer


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A directory holding a tiny byte-level BPE tokenizer.json with <|endoftext|>."""
    directory = tmp_path_factory.mktemp("hf")
    _train_bpe(str(directory / "tokenizer.json"), ["<|endoftext|>"])
    return str(directory)


def _read_documents(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)  # indexed by sequence; document_indices group sequences into documents
    bounds = dataset.document_indices.tolist()
    documents = [
        [token for item in range(start, end) for token in dataset[item].tolist()]
        for start, end in zip(bounds[:-1], bounds[1:])
    ]
    return dataset, documents


def _write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record) + "\n")
    return str(path)


# ---------------------------------------------------------------------------------------------- tokenizers


def test_huggingface_tokenizer(hf_dir):
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))
    from_dir = build_tokenizer("HuggingFaceTokenizer", hf_dir)
    from_file = build_tokenizer("HuggingFaceTokenizer", os.path.join(hf_dir, "tokenizer.json"))
    assert isinstance(from_dir, TextTokenizer)
    assert from_dir.vocab_size == from_file.vocab_size == reference.get_vocab_size(with_added_tokens=True)
    assert from_dir.eod == from_dir.eos == reference.token_to_id("<|endoftext|>") == 0
    assert from_dir.pad == -1
    for text in SENTENCES:
        ids = from_dir.tokenize(text)
        assert ids == from_file.tokenize(text) == reference.encode(text, add_special_tokens=False).ids
        assert from_dir.eod not in ids and all(0 <= i < from_dir.vocab_size for i in ids)
        assert from_dir.detokenize(ids) == text  # byte-level BPE: exact round trip
    assert from_dir.detokenize(from_dir.tokenize(SENTENCES[0]) + [from_dir.eod]) == SENTENCES[0]
    identity = json.loads(json.dumps(from_dir.unique_identifiers))
    assert identity["tokenizer_type"] == "HuggingFaceTokenizer" and identity["eod"] == 0


def test_huggingface_eod_token_lookup(tmp_path):
    # A tokenizer_config.json's eos_token wins; else the first known end-of-text name present.
    reference = _train_bpe(str(tmp_path / "s" / "tokenizer.json"), ["<s>", "</s>"])
    assert build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "s")).eod == reference.token_to_id("</s>")
    with open(tmp_path / "s" / "tokenizer_config.json", "w") as config:
        json.dump({"eos_token": {"content": "<s>"}}, config)
    assert build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "s")).eod == reference.token_to_id("<s>")

    _train_bpe(str(tmp_path / "none" / "tokenizer.json"), [])
    with pytest.raises(ValueError, match="no end-of-text token"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "none"))


def test_sentencepiece_tokenizer(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    (tmp_path / "train.txt").write_text("\n".join(SENTENCES[:4] * 10))
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "train.txt"), model_prefix=str(tmp_path / "spm"), vocab_size=80,
        model_type="bpe", character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
    )
    model = str(tmp_path / "spm.model")
    reference = spm.SentencePieceProcessor(model_file=model)
    tokenizer = build_tokenizer("SentencePieceTokenizer", model)
    assert tokenizer.vocab_size == reference.get_piece_size()
    assert tokenizer.eod == reference.eos_id() == 2
    assert tokenizer.pad == reference.pad_id() == -1
    for text in SENTENCES[:4]:
        ids = tokenizer.tokenize(text)
        assert ids == reference.encode(text)
        assert tokenizer.detokenize(ids) == text
    identity = json.loads(json.dumps(tokenizer.unique_identifiers))  # part of the dataset cache hash: JSON
    assert (identity["tokenizer_type"], identity["tokenizer_model"], identity["vocab_size"]) == (
        "SentencePieceTokenizer", os.path.abspath(model), reference.get_piece_size())


def test_null_tokenizer_matches_megatron_lm_0_19():
    # Megatron-LM 0.19 (megatron-core >= 0.18 NullTokenizer): --vocab-size N -> vocab_size N, eod N - 1,
    # pad -1; the model's padded vocabulary is then N for N = 1024.
    tokenizer = build_tokenizer("NullTokenizer", vocab_size=1024)
    assert (tokenizer.vocab_size, tokenizer.eod, tokenizer.pad) == (1024, 1023, -1)
    assert vocab_size_with_padding(tokenizer.vocab_size) == 1024
    assert tokenizer.tokenize("11 325 97") == [11, 325, 97]
    assert tokenizer.detokenize([11, 325, 97]) == "11 325 97"
    assert json.loads(json.dumps(tokenizer.unique_identifiers))["vocab_size"] == 1024
    assert build_tokenizer("NullTokenizer", vocab_size=1).eod == 0


def test_vocab_size_with_padding():
    assert vocab_size_with_padding(8192) == 8192
    assert vocab_size_with_padding(1025) == 1152
    assert vocab_size_with_padding(50257) == 50304
    assert vocab_size_with_padding(50257, 128, 8) == 51200
    assert vocab_size_with_padding(1, make_vocab_size_divisible_by=1) == 1
    with pytest.raises(ValueError):
        vocab_size_with_padding(0)


def test_build_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown --tokenizer-type"):
        build_tokenizer("GPT2BPETokenizer", str(tmp_path))
    with pytest.raises(ValueError, match="needs --tokenizer-model"):
        build_tokenizer("HuggingFaceTokenizer")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path))  # a directory without tokenizer.json
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot load"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path))
    with pytest.raises(FileNotFoundError):
        build_tokenizer("SentencePieceTokenizer", str(tmp_path / "missing.model"))
    with pytest.raises(ValueError, match="--vocab-size"):
        build_tokenizer("NullTokenizer")
    with pytest.raises(ValueError, match="positive integer"):
        build_tokenizer("NullTokenizer", vocab_size=0)


# ---------------------------------------------------------------------------------------- preprocess_data


@pytest.mark.parametrize("append_eod", [True, False])
def test_preprocess_jsonl(tmp_path, hf_dir, append_eod):
    tokenizer = build_tokenizer("HuggingFaceTokenizer", hf_dir)
    records = [{"text": text, "id": i} for i, text in enumerate(SENTENCES)]
    records.insert(2, {"text": ""})  # tokenizes to nothing: skipped
    records.append({"text": SENTENCES[:2]})  # a list of strings: one sequence each, one document
    jsonl = _write_jsonl(tmp_path / "in.jsonl", records)

    summary = preprocess_data.preprocess(
        jsonl, str(tmp_path / "out" / "data"), "HuggingFaceTokenizer", hf_dir, append_eod=append_eod
    )
    prefix = str(tmp_path / "out" / "data_text_document")
    assert summary["keys"]["text"]["bin"] == prefix + ".bin" and os.path.isfile(prefix + ".idx")
    eod = [tokenizer.eod] if append_eod else []
    expected = [tokenizer.tokenize(text) + eod for text in SENTENCES]
    expected.append(tokenizer.tokenize(SENTENCES[0]) + tokenizer.tokenize(SENTENCES[1]) + eod)

    dataset, documents = _read_documents(prefix)
    assert documents == expected
    assert dataset.index.dtype == numpy.uint16  # DType.optimal_dtype(vocab_size < 65500)
    lengths = [len(ids) for ids in expected[:-1]]
    lengths += [len(tokenizer.tokenize(SENTENCES[0])), len(tokenizer.tokenize(SENTENCES[1])) + len(eod)]
    assert dataset.sequence_lengths.tolist() == lengths
    assert dataset.document_indices.tolist() == list(range(len(SENTENCES) + 1)) + [len(SENTENCES) + 2]
    info = summary["keys"]["text"]
    assert (info["documents"], info["skipped_empty"]) == (len(SENTENCES) + 1, 1)
    assert info["tokens"] == sum(len(ids) for ids in expected)


def test_preprocess_txt_directory_with_workers(tmp_path, hf_dir):
    tokenizer = build_tokenizer("HuggingFaceTokenizer", hf_dir)
    texts = {
        "a.txt": SENTENCES[0] + "\n\n" + SENTENCES[1] + "\n",
        "b.txt": SENTENCES[2],
        os.path.join("sub", "c.txt"): SENTENCES[4] + "\n",
    }
    for name, text in texts.items():
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_text(text, encoding="utf-8")
    (tmp_path / "in" / "notes.md").write_text("ignored")

    status = preprocess_data.main([
        "--input", str(tmp_path / "in"), "--output-prefix", str(tmp_path / "txt"),
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_dir,
        "--append-eod", "--workers", "2", "--json-keys", "text",
    ])
    assert status == 0
    _, documents = _read_documents(str(tmp_path / "txt_text_document"))
    assert documents == [tokenizer.tokenize(texts[name]) + [tokenizer.eod] for name in sorted(texts)]


def test_preprocess_null_tokenizer(tmp_path):
    jsonl = _write_jsonl(tmp_path / "ids.jsonl", [{"text": "5 6 7"}, {"text": "1023 0"}])
    preprocess_data.preprocess(jsonl, str(tmp_path / "n"), "NullTokenizer", vocab_size=1024, append_eod=True)
    _, documents = _read_documents(str(tmp_path / "n_text_document"))
    assert documents == [[5, 6, 7, 1023], [1023, 0, 1023]]

    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "5 6"}, {"text": "5 2000"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2.*outside \[0, 1024\)"):
        preprocess_data.preprocess(bad, str(tmp_path / "m"), "NullTokenizer", vocab_size=1024)
    assert not any(name.startswith("m_") for name in os.listdir(tmp_path))  # no partial outputs


def test_preprocess_errors(tmp_path, hf_dir, capsys):
    out = str(tmp_path / "out" / "x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        preprocess_data.preprocess(str(tmp_path / "missing.jsonl"), out, "HuggingFaceTokenizer", hf_dir)
    assert preprocess_data.main([
        "--input", str(tmp_path / "missing.jsonl"), "--output-prefix", out,
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_dir,
    ]) == 1
    assert "missing.jsonl" in capsys.readouterr().err

    jsonl = _write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        preprocess_data.preprocess(jsonl, out, "HuggingFaceTokenizer", str(tmp_path / "no_tokenizer"))
    with pytest.raises(ValueError, match=r"in\.jsonl:1: no field 'body'"):
        preprocess_data.preprocess(jsonl, out, "HuggingFaceTokenizer", hf_dir, json_keys=["body"])
    assert not os.path.exists(tmp_path / "out")  # failed before writing anything

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: not valid JSON"):
        preprocess_data.preprocess(str(broken), out, "HuggingFaceTokenizer", hf_dir)
    assert not os.path.exists(out + "_text_document.bin")


def test_gpt_dataset_reads_preprocessed_data(tmp_path, hf_dir):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    tokenizer = build_tokenizer("HuggingFaceTokenizer", hf_dir)
    jsonl = _write_jsonl(tmp_path / "in.jsonl", [{"text": text} for text in SENTENCES * 3])
    preprocess_data.preprocess(jsonl, str(tmp_path / "d"), "HuggingFaceTokenizer", hf_dir, append_eod=True)
    config = GPTDatasetConfig(
        random_seed=1234, sequence_length=16, blend=([str(tmp_path / "d_text_document")], None),
        split="100,0,0", tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, path_to_cache=str(tmp_path / "cache"),
    )
    train, valid, test = BlendedMegatronDatasetBuilder(GPTDataset, [8, 0, 0], lambda: True, config).build()
    assert valid is None and test is None and len(train) >= 8
    stream = [i for text in SENTENCES * 3 for i in tokenizer.tokenize(text) + [tokenizer.eod]]
    sample = train[0]
    tokens, labels = sample["tokens"].tolist(), sample["labels"].tolist()
    assert tokens[1:] == labels[:-1] and len(tokens) == 16
    # GPTDataset samples are windows of the (document-shuffled) token stream: every token id is a real one
    assert set(tokens + labels) <= set(stream)
