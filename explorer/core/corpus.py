"""Reading corpora as streams of documents, and packing them into fixed token windows.

Formats (``format="auto"`` picks by the path):

- ``text``: a plain text file (``.txt``, ``.cor``, anything else); one document per line
  (``text_mode="lines"``, the default) or per blank-line-separated paragraph
  (``text_mode="paragraphs"``). Blank lines are not documents.
- ``jsonl``: one JSON object per line (``.jsonl``, ``.ndjson``, ``.json``) with the text in
  ``text_field`` (default ``"text"``).
- ``parquet``: a parquet file (``.parquet``, ``.pq``) with a ``text_field`` column; needs pyarrow.
- ``datasets``: a directory written by ``datasets``' ``save_to_disk`` (a ``Dataset`` or a
  ``DatasetDict``: the ``split`` argument, else ``train``, else its first split); needs ``datasets``.

Text and JSONL files may be gzip-compressed (``.gz``). Everything is streamed: documents are read
one at a time (parquet in record batches, ``datasets`` from its memory-mapped Arrow files), so a
corpus is never loaded whole. Problems raise a ``CorpusError`` with a one-line message.

``token_windows`` tokenises documents one by one and packs their tokens into windows of exactly
``window`` tokens. Documents are concatenated in order with a separator (the tokens of ``"\\n\\n"``
by default) after each one, so a window may span a document boundary. A window's provenance is
``(doc, offset)``: the document of its first token and that token's offset in the document's token
stream (its tokens followed by the separator). The order is deterministic, and iteration can
restart at any window's ``(doc, offset)`` and yield exactly the windows that followed it. The
final partial window (fewer than ``window`` tokens) is dropped.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from explorer.core.errors import ExplorerError

FORMATS = ("auto", "text", "jsonl", "parquet", "datasets")
TEXT_MODES = ("lines", "paragraphs")
HEAD_BYTES = 1 << 20  # bytes hashed to fingerprint a corpus
_LONG_DOC = 100_000   # characters: longer documents are tokenised in pieces split at whitespace


class CorpusError(ExplorerError):
    """A corpus that is missing, empty or malformed."""


# ------------------------------------------------------------------------------ formats
def detect_format(path: str | Path) -> str:
    """The format of a corpus path: datasets (a directory), parquet, jsonl or text."""
    p = Path(path)
    if p.is_dir():
        if any((p / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return "datasets"
        raise CorpusError(f"{path} is a directory but not a dataset saved with datasets' save_to_disk; "
                          "pass a text, JSONL or parquet file")
    name = p.name.lower().removesuffix(".gz")
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    return "text"


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise CorpusError(f"corpus not found: {path}")


def _open_text(path: Path):
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _text_documents(path: Path, mode: str) -> Iterator[str]:
    with _open_text(path) as f:
        if mode == "lines":
            for line in f:
                text = line.strip()
                if text:
                    yield text
            return
        para: list[str] = []
        for line in f:
            if line.strip():
                para.append(line.rstrip("\n"))
            elif para:
                yield "\n".join(para).strip()
                para = []
        if para:
            yield "\n".join(para).strip()


def _field_text(value, field: str, where: str):
    if value is None:
        return None
    if not isinstance(value, str):
        raise CorpusError(f"{where}: the '{field}' field is {type(value).__name__}, not text; pass --text-field")
    return value


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    with _open_text(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise CorpusError(f"{path}, line {number}: expected a JSON object with a '{field}' field, "
                                  f"got {type(obj).__name__}")
            if field not in obj:
                keys = ", ".join(sorted(obj)[:8]) or "none"
                raise CorpusError(f"{path}, line {number}: no '{field}' field (fields: {keys}); "
                                  "pass --text-field")
            text = _field_text(obj[field], field, f"{path}, line {number}")
            if text and text.strip():
                yield text


def _parquet_documents(path: Path, field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError("reading parquet corpora needs pyarrow: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(str(path))
    except Exception as e:
        raise CorpusError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise CorpusError(f"{path}: no column '{field}' (columns: {', '.join(names[:8])}); pass --text-field")
    row = 0
    for batch in pf.iter_batches(batch_size=512, columns=[field]):
        for value in batch.column(0).to_pylist():
            row += 1
            text = _field_text(value, field, f"{path}, row {row}")
            if text and text.strip():
                yield text


def _datasets_documents(path: Path, field: str, split: str | None) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise CorpusError("reading a saved datasets dataset needs the datasets package: "
                          "pip install datasets") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise CorpusError(f"{path}: cannot load the saved dataset ({str(e).splitlines()[0]})") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        if split is None:
            split = "train" if "train" in ds else (names[0] if names else None)
        if split not in ds:
            raise CorpusError(f"{path}: no split '{split}' (splits: {', '.join(names) or 'none'})")
        ds = ds[split]
    if field not in ds.column_names:
        raise CorpusError(f"{path}: no column '{field}' (columns: {', '.join(ds.column_names[:8])}); "
                          "pass --text-field")
    row = 0
    for batch in ds.select_columns([field]).iter(batch_size=512):
        for value in batch[field]:
            row += 1
            text = _field_text(value, field, f"{path}, row {row}")
            if text and text.strip():
                yield text


def iter_documents(path: str | Path, *, format: str = "auto", text_field: str = "text",
                   text_mode: str = "lines", split: str | None = None) -> Iterator[str]:
    """Stream the documents of a corpus (see the module docstring for formats).

    Raises ``CorpusError`` for a missing path, an unknown format, a malformed file (naming the
    line or row) and, once the stream ends, for a corpus with no documents at all.
    """
    path = Path(path).expanduser()
    if format not in FORMATS:
        raise CorpusError(f"unknown corpus format '{format}' (use {', '.join(FORMATS)})")
    if text_mode not in TEXT_MODES:
        raise CorpusError(f"unknown text mode '{text_mode}' (use {', '.join(TEXT_MODES)})")
    _check_exists(path)
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "text":
        docs = _text_documents(path, text_mode)
    elif fmt == "jsonl":
        docs = _jsonl_documents(path, text_field)
    elif fmt == "parquet":
        docs = _parquet_documents(path, text_field)
    else:
        docs = _datasets_documents(path, text_field, split)
    return _nonempty(docs, path)


def _nonempty(docs: Iterator[str], path: Path) -> Iterator[str]:
    n = 0
    for doc in docs:
        n += 1
        yield doc
    if n == 0:
        raise CorpusError(f"corpus {path} has no documents (it is empty or blank)")


def corpus_fingerprint(path: str | Path) -> dict:
    """Path, size in bytes and a SHA-256 of the first MiB (of each file, for a directory)."""
    p = Path(path).expanduser()
    _check_exists(p)
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    size = 0
    for f in files:
        size += f.stat().st_size
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(HEAD_BYTES))
    return {"path": str(p.resolve()), "size": size, "head_sha256": h.hexdigest()[:16]}


# ------------------------------------------------------------------------------ windows
@dataclass(frozen=True)
class Window:
    """One window of token ids and where its first token came from."""

    index: int        # 0-based position of the window in the stream
    doc: int          # document of the window's first token
    offset: int       # offset of that token in the document's token stream (tokens + separator)
    ids: np.ndarray   # [window] int64
    end: tuple[int, int]  # (doc, offset) of the token after the window: where the next one starts


def _tokenize(tokenizer, text: str) -> list[int]:
    """Token ids of a document without special tokens; very long ones in whitespace-split pieces."""
    if len(text) <= _LONG_DOC:
        return tokenizer(text, add_special_tokens=False).input_ids
    ids: list[int] = []
    start = 0
    while start < len(text):
        end = min(len(text), start + _LONG_DOC)
        if end < len(text):
            cut = text.rfind(" ", start + _LONG_DOC // 2, end)
            end = cut if cut > start else end
        ids += tokenizer(text[start:end], add_special_tokens=False).input_ids
        start = end
    return ids


def separator_ids(tokenizer, separator: str | None = "\n\n") -> list[int]:
    """The token ids put after every document (none for ``separator=None`` or ``""``)."""
    if not separator:
        return []
    return list(tokenizer(separator, add_special_tokens=False).input_ids)


def token_windows(documents: Iterable[str], tokenizer, window: int, max_tokens: int | None = None, *,
                  separator: str | None = "\n\n", start: tuple[int, int] = (0, 0),
                  start_index: int = 0) -> Iterator[Window]:
    """Pack the documents' tokens into windows of ``window`` tokens, in order.

    ``max_tokens`` caps the tokens of the whole stream (windows ``0 .. max_tokens // window - 1``),
    counted from the first window even when restarting. To restart after window ``i - 1``, pass
    ``start`` = window ``i``'s ``(doc, offset)`` and ``start_index=i``: documents before ``doc``
    are skipped without tokenising them.
    """
    if window < 1:
        raise CorpusError(f"the window must be at least 1 token, got {window}")
    limit = None if max_tokens is None else max_tokens // window
    index = start_index
    if limit is not None and index >= limit:
        return
    sep = separator_ids(tokenizer, separator)
    buf: list[int] = []
    first: tuple[int, int] | None = None
    start_doc, start_offset = start
    for doc, text in enumerate(documents):
        if doc < start_doc:
            continue
        stream = _tokenize(tokenizer, text) + sep
        pos = start_offset if doc == start_doc else 0
        while pos < len(stream):
            if not buf:
                first = (doc, pos)
            take = min(window - len(buf), len(stream) - pos)
            buf.extend(stream[pos:pos + take])
            pos += take
            if len(buf) == window:
                assert first is not None
                end = (doc, pos) if pos < len(stream) else (doc + 1, 0)
                yield Window(index, first[0], first[1], np.asarray(buf, dtype=np.int64), end)
                index += 1
                buf = []
                if limit is not None and index >= limit:
                    return


def batched(windows: Iterable[Window], size: int) -> Iterator[list[Window]]:
    """Group windows into lists of ``size`` (the last may be shorter)."""
    batch: list[Window] = []
    for w in windows:
        batch.append(w)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
