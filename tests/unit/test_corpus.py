"""Corpus reading (text, JSONL, parquet, saved datasets) and packing into token windows."""
from __future__ import annotations

import gzip
import json
import sys

import numpy as np
import pytest

from explorer.core.corpus import (
    CorpusError,
    batched,
    corpus_fingerprint,
    detect_format,
    iter_documents,
    separator_ids,
    token_windows,
)
from explorer.core.errors import ExplorerError

DOCS = ["The first document is about the weather.", "Second: he said that she would come.",
        "A third, longer document with several words in it, to fill a window or two."]


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------ text and JSONL
def test_text_one_document_per_line_skips_blank_lines(tmp_path):
    p = write(tmp_path / "c.txt", f"{DOCS[0]}\n\n   \n{DOCS[1]}\n{DOCS[2]}")
    assert list(iter_documents(p)) == DOCS


def test_text_paragraphs(tmp_path):
    p = write(tmp_path / "c.txt", "line one\nline two\n\n\npara two\n\nlast\n")
    assert list(iter_documents(p, text_mode="paragraphs")) == ["line one\nline two", "para two", "last"]


def test_gzip_text(tmp_path):
    p = tmp_path / "c.txt.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.write("\n".join(DOCS))
    assert list(iter_documents(p)) == DOCS


def test_jsonl_with_text_field(tmp_path):
    p = write(tmp_path / "c.jsonl", "\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(DOCS)))
    assert detect_format(p) == "jsonl"
    assert list(iter_documents(p, text_field="body")) == DOCS


def test_jsonl_bad_line_names_the_line(tmp_path):
    p = write(tmp_path / "c.jsonl", json.dumps({"text": "ok"}) + "\n\n{not json\n")
    docs = iter_documents(p)
    assert next(docs) == "ok"
    with pytest.raises(CorpusError, match=r"line 3: not valid JSON"):
        next(docs)


def test_jsonl_missing_field_and_wrong_types(tmp_path):
    p = write(tmp_path / "c.jsonl", json.dumps({"body": "x"}) + "\n")
    with pytest.raises(CorpusError, match=r"line 1: no 'text' field \(fields: body\); pass --text-field"):
        list(iter_documents(p))
    p = write(tmp_path / "d.jsonl", "[1, 2]\n")
    with pytest.raises(CorpusError, match="line 1: expected a JSON object"):
        list(iter_documents(p))
    p = write(tmp_path / "e.jsonl", json.dumps({"text": 5}) + "\n")
    with pytest.raises(CorpusError, match="is int, not text"):
        list(iter_documents(p))


def test_missing_and_empty_corpus(tmp_path):
    with pytest.raises(CorpusError, match="corpus not found"):
        iter_documents(tmp_path / "nope.txt")
    p = write(tmp_path / "empty.txt", "\n  \n")
    with pytest.raises(CorpusError, match="has no documents"):
        list(iter_documents(p))
    p = write(tmp_path / "empty.jsonl", "")
    with pytest.raises(CorpusError, match="has no documents"):
        list(iter_documents(p))
    assert issubclass(CorpusError, ExplorerError)


def test_bad_options_and_plain_directory(tmp_path):
    p = write(tmp_path / "c.txt", "x")
    with pytest.raises(CorpusError, match="unknown corpus format"):
        iter_documents(p, format="csv")
    with pytest.raises(CorpusError, match="unknown text mode"):
        iter_documents(p, text_mode="sentences")
    with pytest.raises(CorpusError, match="not a dataset saved"):
        iter_documents(tmp_path)


def test_reading_streams(tmp_path):
    """Documents come one at a time: the first is available before a bad line far below is read."""
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(5000)] + ["oops"]
    p = write(tmp_path / "big.jsonl", "\n".join(lines))
    docs = iter_documents(p)
    assert [next(docs) for _ in range(3)] == ["doc 0", "doc 1", "doc 2"]
    with pytest.raises(CorpusError, match="line 5001"):
        list(docs)


# ------------------------------------------------------------------ parquet / datasets
def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    p = tmp_path / "c.parquet"
    p.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(CorpusError, match="pip install pyarrow"):
        list(iter_documents(p))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"content": DOCS + [None], "n": [1, 2, 3, 4]}), p, row_group_size=2)
    assert detect_format(p) == "parquet"
    assert list(iter_documents(p, text_field="content")) == DOCS
    with pytest.raises(CorpusError, match=r"no column 'text' \(columns: content, n\)"):
        list(iter_documents(p))


def test_datasets_without_package_is_a_clear_error(tmp_path, monkeypatch):
    d = tmp_path / "ds"
    d.mkdir()
    (d / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(CorpusError, match="pip install datasets"):
        list(iter_documents(d))


def test_saved_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    from datasets.table import InMemoryTable

    def dataset(texts, fingerprint):  # explicit fingerprints: no dill hashing of the table
        return datasets.Dataset(InMemoryTable(pa.table({"text": texts})), fingerprint=fingerprint)

    d = tmp_path / "ds"
    datasets.DatasetDict({"train": dataset(DOCS, "train0"), "test": dataset(["held out"], "test0")}
                         ).save_to_disk(str(d))
    assert detect_format(d) == "datasets"
    assert list(iter_documents(d)) == DOCS
    assert list(iter_documents(d, split="test")) == ["held out"]
    with pytest.raises(CorpusError, match="no split 'dev'"):
        list(iter_documents(d, split="dev"))


# ------------------------------------------------------------------ fingerprint
def test_fingerprint_changes_with_content(tmp_path):
    p = write(tmp_path / "c.txt", "abc\n")
    a = corpus_fingerprint(p)
    assert a["size"] == 4 and len(a["head_sha256"]) == 16
    write(p, "abd\n")
    assert corpus_fingerprint(p)["head_sha256"] != a["head_sha256"]


# ------------------------------------------------------------------ windows
@pytest.fixture(scope="module")
def lee_docs():
    from explorer.core.defaults import ensure_default_corpus

    with open(ensure_default_corpus(), encoding="utf-8") as f:
        return [line.strip() for _, line in zip(range(12), f) if line.strip()]


def test_windows_pack_documents_with_separators_and_provenance(tokenizer, lee_docs):
    sep = separator_ids(tokenizer)
    assert sep  # "\n\n" is at least one token
    streams = [tokenizer(d, add_special_tokens=False).input_ids + sep for d in lee_docs]
    flat = [t for s in streams for t in s]
    wins = list(token_windows(lee_docs, tokenizer, 32))
    assert len(wins) == len(flat) // 32  # the final partial window is dropped
    for i, w in enumerate(wins):
        assert w.index == i and w.ids.shape == (32,)
        assert w.ids.tolist() == flat[32 * i: 32 * (i + 1)]
        # provenance: the window starts at (doc, offset) of the per-document streams
        assert streams[w.doc][w.offset] == w.ids[0]
        assert sum(len(s) for s in streams[:w.doc]) + w.offset == 32 * i
        nxt = wins[i + 1] if i + 1 < len(wins) else None
        if nxt is not None:
            assert w.end == (nxt.doc, nxt.offset)


def test_windows_cap_restart_and_determinism(tokenizer, lee_docs):
    full = list(token_windows(lee_docs, tokenizer, 16))
    again = list(token_windows(iter(lee_docs), tokenizer, 16))
    assert [w.ids.tolist() for w in full] == [w.ids.tolist() for w in again]
    capped = list(token_windows(lee_docs, tokenizer, 16, max_tokens=100))
    assert len(capped) == 6 and [w.ids.tolist() for w in capped] == [w.ids.tolist() for w in full[:6]]
    for i in (1, 7, len(full) - 1):
        rest = list(token_windows(lee_docs, tokenizer, 16, start=(full[i].doc, full[i].offset), start_index=i))
        assert [w.index for w in rest] == list(range(i, len(full)))
        assert all(np.array_equal(a.ids, b.ids) and (a.doc, a.offset) == (b.doc, b.offset)
                   for a, b in zip(rest, full[i:]))
    # the cap counts from the first window, also when restarting
    rest = list(token_windows(lee_docs, tokenizer, 16, max_tokens=100, start=(full[4].doc, full[4].offset),
                              start_index=4))
    assert [w.index for w in rest] == [4, 5]


def test_windows_without_separator_and_batching(tokenizer):
    docs = ["one two three", "four five"]
    wins = list(token_windows(docs, tokenizer, 2, separator=None))
    flat = tokenizer(docs[0], add_special_tokens=False).input_ids + tokenizer(docs[1], add_special_tokens=False).input_ids
    assert [t for w in wins for t in w.ids.tolist()] == flat[: len(flat) // 2 * 2]
    assert [len(b) for b in batched(range(7), 3)] == [3, 3, 1]
    with pytest.raises(CorpusError):
        list(token_windows(docs, tokenizer, 0))


def test_long_documents_are_tokenised_in_pieces(tokenizer):
    doc = " ".join(["word"] * 60_000)  # > 100k characters
    wins = list(token_windows([doc], tokenizer, 64, separator=None))
    n = len(tokenizer(doc, add_special_tokens=False).input_ids)
    assert abs(len(wins) * 64 - n) <= 64 + 4  # same tokens up to a piece boundary or two
