"""Tests of the tokenizers (offline GPT-2, trained BPE, [MASK] handling) and of the data pipeline."""

import base64
import copy
import importlib.util
import json
import logging
from collections import Counter
from pathlib import Path

import huggingface_hub.constants
import pytest
import regex
import torch
from datasets import Dataset, DatasetDict, IterableDatasetDict

from dsl_diffusion.trainer.data import (
    BBC_CORPUS_NAME,
    DiffusionDataCollator,
    build_datasets,
    load_bbc_news,
    load_brown_corpus,
    load_text_dataset,
    pack_wrapped,
    pad_rows,
    tokenize_dataset,
)
from dsl_diffusion.trainer.tokenization import (
    add_mask_token,
    build_offline_gpt2_tokenizer,
    load_tokenizer,
    train_bpe_tokenizer,
)


GPT2_EOS = 50256
GPT2_MASK = 50257
# GPT-2's pre-tokenization regex (from OpenAI's encoder.py), for the reference BPE below.
GPT2_SPLIT_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    tokenizer = build_offline_gpt2_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    return add_mask_token(tokenizer)


@pytest.fixture(scope="module")
def bbc_documents():
    return load_bbc_news()


@pytest.fixture(scope="module")
def bbc_texts(bbc_documents):
    # Every 11th article: a few hundred documents from all five categories.
    return list(bbc_documents.select(range(0, len(bbc_documents), 11))["text"])


@pytest.fixture(scope="module")
def small_bpe_tokenizer(bbc_texts):
    return train_bpe_tokenizer(bbc_texts, vocab_size=600)


# --------------------------------------------------------------------------------------------------
# Offline GPT-2 tokenizer
# --------------------------------------------------------------------------------------------------


def test_offline_gpt2_known_ids():
    tokenizer = build_offline_gpt2_tokenizer()
    assert len(tokenizer) == 50257
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == tokenizer.unk_token_id == GPT2_EOS
    assert tokenizer.model_max_length == 1024
    known = {
        "Hello world": [15496, 995],
        " Hello world": [18435, 995],
        " the": [262],
        "The": [464],
        "\n\n": [628],
        "<|endoftext|>": [GPT2_EOS],
    }
    for text, ids in known.items():
        assert tokenizer(text)["input_ids"] == ids, text


def _rank_greedy_bpe(word: bytes, ranks: dict[bytes, int]) -> list[int]:
    """tiktoken's BPE: repeatedly merge the adjacent pair whose merged token has the lowest rank."""
    parts = [bytes([byte]) for byte in word]
    while len(parts) > 1:
        candidates = [(ranks.get(parts[i] + parts[i + 1]), i) for i in range(len(parts) - 1)]
        candidates = [(rank, i) for rank, i in candidates if rank is not None]
        if not candidates:
            break
        _, i = min(candidates)
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2 :]
    return [ranks[part] for part in parts]


def test_offline_gpt2_matches_reference_bpe_on_real_text(gpt2_tokenizer, bbc_texts):
    # Independent reference: parse the rank file and run tiktoken's algorithm on GPT-2's regex pieces.
    rank_file = (
        Path(next(iter(importlib.util.find_spec("whisper").submodule_search_locations))) / "assets/gpt2.tiktoken"
    )
    ranks = {}
    for line in rank_file.read_text().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    texts = bbc_texts[:60] + ["Ünïcödé naïve café – “quotes” 😀 日本語 \t tabs   and  spaces\n\n\nend  "]
    for text in texts:
        expected = [
            token
            for piece in GPT2_SPLIT_PATTERN.findall(text)
            for token in _rank_greedy_bpe(piece.encode("utf-8"), ranks)
        ]
        assert gpt2_tokenizer(text, add_special_tokens=False)["input_ids"] == expected


def test_offline_gpt2_round_trips_text(gpt2_tokenizer, bbc_texts):
    for text in bbc_texts[:20] + ["naïve café – 😀 日本語\n\n  two  spaces <|endoftext|>"]:
        assert gpt2_tokenizer.decode(gpt2_tokenizer(text)["input_ids"]) == text


def test_gpt2_mask_and_pad_ids(gpt2_tokenizer):
    assert gpt2_tokenizer.mask_token == "[MASK]"
    assert gpt2_tokenizer.mask_token_id == GPT2_MASK
    assert len(gpt2_tokenizer) == GPT2_MASK + 1
    assert gpt2_tokenizer.pad_token_id == gpt2_tokenizer.eos_token_id == GPT2_EOS
    assert gpt2_tokenizer.convert_tokens_to_ids("[MASK]") == GPT2_MASK
    # Adding the mask twice is a no-op.
    assert add_mask_token(copy.deepcopy(gpt2_tokenizer)).mask_token_id == GPT2_MASK


def test_load_tokenizer_falls_back_to_offline_gpt2(monkeypatch, caplog):
    # Offline mode makes the Hub lookup fail at once instead of after network retries.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with caplog.at_level(logging.INFO, logger="dsl_diffusion.trainer.tokenization"):
        tokenizer = load_tokenizer("gpt2")
    assert "offline" in caplog.text
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert (tokenizer.mask_token_id, tokenizer.pad_token_id, len(tokenizer)) == (GPT2_MASK, GPT2_EOS, GPT2_MASK + 1)


def test_load_tokenizer_does_not_fall_back_for_other_ids(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError):
        load_tokenizer("some-org/not-a-gpt2-tokenizer")


def test_load_tokenizer_from_local_directory(small_bpe_tokenizer, tmp_path):
    small_bpe_tokenizer.save_pretrained(tmp_path)
    reloaded = load_tokenizer(str(tmp_path))
    text = "The chancellor said growth was strong."
    assert reloaded(text)["input_ids"] == small_bpe_tokenizer(text)["input_ids"]
    assert reloaded.mask_token_id == small_bpe_tokenizer.mask_token_id == len(reloaded) - 1
    assert reloaded.pad_token_id == reloaded.eos_token_id


def test_add_mask_token_rejects_bad_layouts(small_bpe_tokenizer):
    mask_not_last = copy.deepcopy(small_bpe_tokenizer)
    mask_not_last.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    with pytest.raises(ValueError, match="last id"):
        add_mask_token(mask_not_last)

    pad_is_mask = copy.deepcopy(small_bpe_tokenizer)
    pad_is_mask.pad_token = pad_is_mask.mask_token
    with pytest.raises(ValueError, match="pad_token"):
        add_mask_token(pad_is_mask)


# --------------------------------------------------------------------------------------------------
# Trained BPE tokenizer
# --------------------------------------------------------------------------------------------------


def test_train_bpe_tokenizer_layout_and_round_trip(small_bpe_tokenizer, bbc_texts):
    tokenizer = small_bpe_tokenizer
    # 600 real tokens (256 bytes, <|endoftext|>, merges), then [MASK] = 600.
    assert len(tokenizer) == 601
    assert tokenizer.mask_token_id == 600
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == 0
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == tokenizer.pad_token_id == 0
    for text in bbc_texts[:10] + ["unseen wörds 😀  and\n\nnewlines"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert max(ids) < 600
        assert tokenizer.decode(ids) == text
    # Merges were learned: a news article takes far fewer tokens than bytes.
    article = bbc_texts[0]
    assert len(tokenizer(article)["input_ids"]) < 0.6 * len(article.encode("utf-8"))


def test_train_bpe_tokenizer_is_deterministic(small_bpe_tokenizer, bbc_texts):
    again = train_bpe_tokenizer(bbc_texts, vocab_size=600)
    assert again.backend_tokenizer.to_str() == small_bpe_tokenizer.backend_tokenizer.to_str()


def test_train_bpe_tokenizer_validates_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(["some text"], vocab_size=100)
    with pytest.raises(TypeError, match="iterable of documents"):
        train_bpe_tokenizer("a single string", vocab_size=300)
    with pytest.raises(ValueError, match="min_frequency"):
        train_bpe_tokenizer(["some text"], vocab_size=300, min_frequency=0)


# --------------------------------------------------------------------------------------------------
# Loading and splitting
# --------------------------------------------------------------------------------------------------


def test_bbc_corpus_contents(bbc_documents):
    assert len(bbc_documents) == 2225
    assert Counter(bbc_documents["category"]) == {
        "business": 510,
        "entertainment": 386,
        "politics": 417,
        "sports": 511,
        "tech": 401,
    }
    assert len(set(bbc_documents["document_id"])) == 2225
    # Title, blank line, body; the one Windows-1252 file decodes its pound sign.
    first = bbc_documents[0]["text"]
    assert "\n\n" in first and first == first.strip()
    cp1252_article = bbc_documents[list(bbc_documents["document_id"]).index("sports/199")]["text"]
    assert "£" in cp1252_article


def test_bbc_split_is_document_level_and_never_leaks():
    splits = load_text_dataset(BBC_CORPUS_NAME)
    train_texts, validation_texts = list(splits["train"]["text"]), list(splits["validation"]["text"])
    assert len(train_texts) + len(validation_texts) == 2225
    assert set(train_texts).isdisjoint(validation_texts)
    assert 0.03 < len(validation_texts) / 2225 < 0.08  # validation_fraction = 0.05
    # Deterministic, and the seed picks another (still leak-free) split.
    assert list(load_text_dataset(BBC_CORPUS_NAME)["validation"]["document_id"]) == list(
        splits["validation"]["document_id"]
    )
    other = load_text_dataset(BBC_CORPUS_NAME, seed=1)
    assert set(other["validation"]["document_id"]) != set(splits["validation"]["document_id"])
    assert set(other["train"]["text"]).isdisjoint(other["validation"]["text"])


def test_brown_corpus_contents():
    brown = load_brown_corpus()
    assert len(brown) == 500 and len(set(brown["document_id"])) == 500
    genres = Counter(brown["category"])
    assert len(genres) == 15 and genres["learned"] == 80 and genres["news"] == 44
    first = brown[0]["text"]
    assert first.startswith("The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary")
    assert '"no evidence" that any irregularities took place.' in first and "\n\n" in first
    words = sum(len(text.split()) for text in brown["text"])
    assert 950_000 < words < 1_100_000  # ~1M words of running text
    everything = "\n".join(brown["text"])
    # No tag, quote token or doubled punctuation of the tagged files survives.
    for leftover in ("/nn", "/at ", "``", " '' ", " ;;", "??", "Jr.."):  # (inch marks like 10'' are real text)
        assert leftover not in everything, leftover


def test_joined_embedded_corpora_split_without_leaks():
    splits = load_text_dataset("bbc+brown")
    ids = list(splits["train"]["document_id"]) + list(splits["validation"]["document_id"])
    assert len(ids) == 2725 and len(set(ids)) == 2725
    assert set(splits["train"]["text"]).isdisjoint(splits["validation"]["text"])
    assert any(i.startswith("brown/") for i in splits["validation"]["document_id"])
    with pytest.raises(ValueError, match="'bbc\\+bbc'.*accepted names are \\['bbc', 'brown'\\]"):
        load_text_dataset("bbc+bbc")


def test_streaming_split_matches_in_memory_split():
    in_memory = load_text_dataset(BBC_CORPUS_NAME, validation_fraction=0.1)
    streamed = load_text_dataset(BBC_CORPUS_NAME, validation_fraction=0.1, streaming=True)
    assert isinstance(streamed, IterableDatasetDict)
    assert [row["document_id"] for row in streamed["validation"]] == list(in_memory["validation"]["document_id"])


def _write_jsonl(path: Path, documents: list[str], column: str = "body") -> None:
    path.write_text("".join(json.dumps({column: text, "id": i}) + "\n" for i, text in enumerate(documents)))


def test_load_jsonl_and_json_files(tmp_path):
    documents = [f"Document number {i} talks about topic {i % 7}." for i in range(60)]
    _write_jsonl(tmp_path / "docs.jsonl", documents)
    splits = load_text_dataset(
        tmp_path / "docs.jsonl", text_column="body", validation_fraction=0.2, cache_dir=str(tmp_path / "cache")
    )
    assert sorted(list(splits["train"]["body"]) + list(splits["validation"]["body"])) == sorted(documents)
    assert set(splits["train"]["body"]).isdisjoint(splits["validation"]["body"])

    (tmp_path / "docs.json").write_text(json.dumps([{"text": text} for text in documents]))
    splits = load_text_dataset(str(tmp_path / "docs.json"), validation_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    assert len(splits["train"]) + len(splits["validation"]) == 60


def test_tail_split_takes_the_last_documents(tmp_path):
    documents = [f"doc {i}" for i in range(30)]
    _write_jsonl(tmp_path / "docs.jsonl", documents)
    splits = load_text_dataset(
        tmp_path / "docs.jsonl", text_column="body", validation_documents=4, cache_dir=str(tmp_path / "cache")
    )
    assert list(splits["validation"]["body"]) == documents[-4:]
    assert list(splits["train"]["body"]) == documents[:-4]
    with pytest.raises(ValueError, match="validation_documents"):
        load_text_dataset(
            tmp_path / "docs.jsonl", text_column="body", validation_documents=30, cache_dir=str(tmp_path / "cache")
        )


def test_load_txt_files_by_document_and_by_paragraph(tmp_path):
    data_dir = tmp_path / "texts"
    data_dir.mkdir()
    for i in range(20):
        (data_dir / f"{i:02d}.txt").write_text(
            f"Title {i}\n\nFirst paragraph of {i}.\nStill first.\n\nSecond paragraph of {i}.\n"
        )
    by_document = load_text_dataset(data_dir, validation_fraction=0.25, cache_dir=str(tmp_path / "cache"))
    texts = list(by_document["train"]["text"]) + list(by_document["validation"]["text"])
    assert len(texts) == 20 and all(text.startswith("Title") and text.count("\n\n") == 2 for text in texts)

    by_paragraph = load_text_dataset(
        data_dir, validation_fraction=0.25, txt_sample_by="paragraph", cache_dir=str(tmp_path / "cache")
    )
    paragraphs = list(by_paragraph["train"]["text"]) + list(by_paragraph["validation"]["text"])
    assert len(paragraphs) == 60
    assert "First paragraph of 3.\nStill first." in paragraphs
    assert set(by_paragraph["train"]["text"]).isdisjoint(by_paragraph["validation"]["text"])


def test_load_text_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown data source"):
        load_text_dataset("not//a valid source")
    with pytest.raises(ValueError, match="not found"):
        load_text_dataset(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="validation_fraction"):
        load_text_dataset(BBC_CORPUS_NAME, validation_fraction=1.0)
    with pytest.raises(ValueError, match="text_column"):
        load_text_dataset(BBC_CORPUS_NAME, text_column="body")
    with pytest.raises(ValueError, match="txt_sample_by"):
        load_text_dataset(BBC_CORPUS_NAME, txt_sample_by="line")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No"):
        load_text_dataset(tmp_path / "empty")
    (tmp_path / "a.txt").write_text("text")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "json"}) + "\n")
    with pytest.raises(ValueError, match="Mixed"):
        load_text_dataset([tmp_path / "a.txt", tmp_path / "b.jsonl"])
    with pytest.raises(ValueError, match="empty"):
        load_text_dataset(tmp_path / "a.txt", cache_dir=str(tmp_path / "cache"))  # one document cannot be split


# --------------------------------------------------------------------------------------------------
# Tokenization, packing, collation
# --------------------------------------------------------------------------------------------------


def test_tokenize_dataset_appends_eos_without_special_tokens(gpt2_tokenizer):
    documents = Dataset.from_dict({"text": ["Hello world", " the"], "category": ["a", "b"]})
    tokenized = tokenize_dataset(documents, gpt2_tokenizer)
    assert tokenized.column_names == ["input_ids"]
    assert list(tokenized["input_ids"]) == [[15496, 995, GPT2_EOS], [262, GPT2_EOS]]


def _tokenizer_with_distinct_specials(small_bpe_tokenizer):
    # bos, eos and pad on three different ids, so the row layouts below can tell them apart.
    tokenizer = copy.deepcopy(small_bpe_tokenizer)
    tokenizer.add_special_tokens({"bos_token": "<s>", "pad_token": "<pad>"})
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    return tokenizer


def test_pack_wrapped_known_answer(small_bpe_tokenizer):
    tokenizer = _tokenizer_with_distinct_specials(small_bpe_tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    tokenized = Dataset.from_dict({"input_ids": [[10, 11, 12, eos], [13, 14, eos], [15, eos]]})
    packed = pack_wrapped(tokenized, block_size=5, tokenizer=tokenizer)
    # The 9-token stream 10 11 12 E 13 14 E 15 E is cut into three chunks of block_size - 2 = 3 tokens.
    assert list(packed["input_ids"]) == [[bos, 10, 11, 12, eos], [bos, eos, 13, 14, eos], [bos, eos, 15, eos, eos]]
    assert list(packed["attention_mask"]) == [[1] * 5] * 3
    # One more token leaves an incomplete chunk, which is dropped.
    longer = Dataset.from_dict({"input_ids": [[10, 11, 12, eos], [13, 14, eos], [15, 16, eos]]})
    assert len(pack_wrapped(longer, block_size=5, tokenizer=tokenizer)) == 3


def test_pack_wrapped_on_real_documents(gpt2_tokenizer, bbc_texts):
    tokenized = tokenize_dataset(Dataset.from_dict({"text": bbc_texts}), gpt2_tokenizer)
    stream = [token for ids in list(tokenized["input_ids"]) for token in ids]
    block_size = 128
    packed = pack_wrapped(tokenized, block_size, gpt2_tokenizer, batch_size=len(tokenized))
    rows = list(packed["input_ids"])
    assert len(rows) == len(stream) // (block_size - 2)
    assert all(len(row) == block_size and row[0] == GPT2_EOS and row[-1] == GPT2_EOS for row in rows)
    chunks = [token for row in rows for token in row[1:-1]]
    assert chunks == stream[: len(chunks)]
    assert GPT2_MASK not in chunks

    # With smaller map batches each batch drops its own tail (MDLM's behaviour), never more than a chunk each.
    per_batch = pack_wrapped(tokenized, block_size, gpt2_tokenizer, batch_size=50)
    num_batches = -(-len(tokenized) // 50)
    assert len(rows) - num_batches <= len(per_batch) <= len(rows)


def test_pad_rows_known_answer(small_bpe_tokenizer):
    tokenizer = _tokenizer_with_distinct_specials(small_bpe_tokenizer)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    tokenized = Dataset.from_dict({"input_ids": [[10, 11, 12, 13, eos], [14, eos], [eos]]})
    padded = pad_rows(tokenized, block_size=5, tokenizer=tokenizer)
    assert list(padded["input_ids"]) == [[bos, 10, 11, 12, eos], [bos, 14, eos, pad, pad], [bos, eos, pad, pad, pad]]
    assert list(padded["attention_mask"]) == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]


def test_collator_stacks_rows():
    collator = DiffusionDataCollator()
    batch = collator([{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 0]}, {"input_ids": torch.tensor([4, 5, 6])}])
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    with pytest.raises(ValueError, match="one length"):
        collator([{"input_ids": [1, 2, 3]}, {"input_ids": [1, 2]}])
    with pytest.raises(ValueError, match="attention_mask"):
        collator([{"input_ids": [1, 2, 3], "attention_mask": [1, 1]}])


@pytest.mark.parametrize("packing", ["wrapped", "padded"])
def test_build_datasets_end_to_end(gpt2_tokenizer, packing):
    block_size = 64
    datasets = build_datasets(BBC_CORPUS_NAME, gpt2_tokenizer, block_size, packing=packing, max_documents=40)
    assert isinstance(datasets, DatasetDict) and set(datasets) == {"train", "validation"}
    assert set(datasets["train"].column_names) == {"input_ids", "attention_mask"}
    batch = DiffusionDataCollator()([datasets["train"][i] for i in range(8)])
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (8, block_size)
    assert (batch["input_ids"][:, 0] == GPT2_EOS).all()  # BOS
    assert int(batch["input_ids"].max()) < GPT2_MASK
    if packing == "padded":
        assert len(datasets["train"]) == 40
        # The last real token of each row is EOS, everything after it is padding.
        lengths = batch["attention_mask"].sum(dim=1)
        assert (batch["input_ids"][torch.arange(8), lengths - 1] == GPT2_EOS).all()
    else:
        assert bool(batch["attention_mask"].all())


def test_pipeline_errors(gpt2_tokenizer):
    documents = Dataset.from_dict({"text": ["a b c"]})
    tokenized = tokenize_dataset(documents, gpt2_tokenizer)
    with pytest.raises(ValueError, match="block_size"):
        pack_wrapped(tokenized, 2, gpt2_tokenizer)
    with pytest.raises(ValueError, match="block_size"):
        pad_rows(tokenized, 2, gpt2_tokenizer)
    with pytest.raises(ValueError, match="packing"):
        build_datasets(BBC_CORPUS_NAME, gpt2_tokenizer, 64, packing="sliding")
    with pytest.raises(ValueError, match="text_column"):
        tokenize_dataset(documents, gpt2_tokenizer, text_column="body")
    no_eos = copy.deepcopy(gpt2_tokenizer)
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="eos"):
        tokenize_dataset(documents, no_eos)
    no_bos = copy.deepcopy(gpt2_tokenizer)
    no_bos.bos_token = None
    with pytest.raises(ValueError, match="bos"):
        pack_wrapped(tokenized, 8, no_bos)
