"""The snapshot loader under hostile input (hypothesis): any corruption of a valid snapshot's
bytes (flips, truncation, member removal, JSON edits, swapped arrays) ends in a SnapshotError,
never another exception; pickles are refused without being run; and whatever still loads is
valid enough for the chart builders to draw."""
from __future__ import annotations

import io
import json
import os
import pickle
import zipfile

import numpy as np
import panel as pn
import pytest
from bokeh.document import Document
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from explorer.analyses.heads import HeadsRequest, attention_patterns, head_scores
from explorer.analyses.lens import CompareRequest, LensRequest, compare_prompts, logit_lens
from explorer.core.jobs import Job
from explorer.interventions.ablation import AblationRequest, SweepRequest, ablate, sweep
from explorer.interventions.patching import PatchRequest, patch
from explorer.neurons.describe import example_activations, token_pattern
from explorer.neurons.index import IndexRequest, build_index, prompt_activation
from explorer.persistence.snapshot import (
    Snapshot,
    SnapshotError,
    load_snapshot,
    model_identity,
    read_snapshot,
    save_snapshot,
)
from explorer.training.swap import audit_swap
from widgets import export
from widgets.snapshot_view import SnapshotView

PROMPT = "The capital of France is"
FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])


class Raw(bytes):
    """The snapshot's bytes, with a short repr (hypothesis prints the arguments of a failure)."""

    def __repr__(self) -> str:
        return f"<snapshot zip, {len(self)} bytes>"


@pytest.fixture(scope="module")
def raw(tiny_sessions, tmp_path_factory) -> bytes:
    """A small valid snapshot holding one result of most kinds (nested results included)."""
    s = tiny_sessions["gpt2"]
    from explorer.core.defaults import ensure_default_corpus

    with open(ensure_default_corpus(), encoding="utf-8") as f:
        text = "".join(next(f) for _ in range(3))
    corpus = tmp_path_factory.mktemp("c") / "c.txt"
    corpus.write_text(text, encoding="utf-8")
    index = build_index(s, IndexRequest(corpus_path=str(corpus), max_tokens=128, window=8, top_k=3, n_random=2,
                                        batch_windows=8), out_dir=tmp_path_factory.mktemp("i") / "idx")
    top, _ = example_activations(index, 1, 2, s)
    attention = attention_patterns(s, "a b a b")
    results = [
        logit_lens(s, LensRequest(PROMPT, top_k=2)),
        compare_prompts(s, CompareRequest("one two", "three four", top_k=2)),
        head_scores(s, HeadsRequest("a b a b", seq_len=3)),
        attention.head(1, 0),
        ablate(s, AblationRequest(PROMPT, " Paris", ("1.0",))),
        Job(lambda ctx: sweep(s, SweepRequest(PROMPT, " Paris", kind="blocks"), ctx=ctx)).run(),
        Job(lambda ctx: patch(s, PatchRequest("one two", "three four", " five"), ctx=ctx)).run(),
        prompt_activation(s, "he said", layer=1, neuron=2),
        index.histogram(1, 2), index.stats(1, 2), token_pattern(index, 1, 2), top,
        audit_swap(["He left."]), s.info(),
    ]
    path = save_snapshot(tmp_path_factory.mktemp("s") / "s.zip", results, model_identity(s))
    return Raw(path.read_bytes())


def _members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def load_or_error(data: bytes):
    """The property every test checks: a Snapshot or a SnapshotError, nothing else."""
    try:
        return read_snapshot(data, "fuzzed.zip")
    except SnapshotError as e:
        assert str(e), "the error names the problem"
        return None


def assert_drawable(snap) -> None:
    """Whatever loads is valid enough for the chart builders (no fallback needed)."""
    for entry in snap.entries:
        build = export.BUILDERS.get(type(entry.result))
        if build is not None:
            build(entry.result, snap.model)
        else:
            export.summary_table(entry.result)


def test_the_fixture_loads_and_draws(raw):
    snap = read_snapshot(raw)
    assert len(snap.entries) == 14
    assert_drawable(snap)


# ------------------------------------------------------------------ bytes
@FUZZ
@given(data=st.data())
def test_flipped_bytes(raw, data):
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 12))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] ^= data.draw(st.integers(1, 255))
    snap = load_or_error(bytes(buf))
    if snap is not None:
        assert_drawable(snap)


@FUZZ
@given(cut=st.integers(0, 10**9))
def test_truncated(raw, cut):
    snap = load_or_error(raw[: cut % len(raw)])
    assert snap is None  # the central directory is at the end: any truncation is refused


@FUZZ
@given(data=st.data())
def test_spliced_bytes(raw, data):
    i = data.draw(st.integers(0, len(raw)))
    j = data.draw(st.integers(i, min(len(raw), i + 64)))
    snap = load_or_error(raw[:i] + data.draw(st.binary(max_size=64)) + raw[j:])
    if snap is not None:
        assert_drawable(snap)


# ------------------------------------------------------------------ members
def test_every_member_is_needed(raw):
    """Removing any one member names it (a manifest, a result, an array)."""
    members = _members(raw)
    for name in members:
        with pytest.raises(SnapshotError) as info:
            read_snapshot(_zip({k: v for k, v in members.items() if k != name}))
        assert name in str(info.value), (name, str(info.value))


@FUZZ
@given(data=st.data())
def test_members_removed_or_duplicated(raw, data):
    members = _members(raw)
    names = sorted(members)
    dropped = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=5, unique=True))
    kept = {k: v for k, v in members.items() if k not in dropped}
    # another member's bytes under a dropped name: the wrong JSON or array in the right place
    for name in data.draw(st.lists(st.sampled_from(dropped), max_size=2, unique=True)):
        kept[name] = members[data.draw(st.sampled_from(names))]
    snap = load_or_error(_zip(kept))
    if snap is not None:
        assert_drawable(snap)


# ------------------------------------------------------------------ JSON edits
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)


def _paths(value, prefix=()):
    """Every path (keys and indices) into a JSON value, the root included."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


def _edit(value, path, action, new):
    if not path:
        return new
    head, rest = path[0], path[1:]
    copy = dict(value) if isinstance(value, dict) else list(value)
    if not rest and action == "delete":
        del copy[head]
    else:
        copy[head] = _edit(value[head], rest, action, new)
    return copy


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(data=st.data())
def test_json_edits(raw, data):
    members = _members(raw)
    name = data.draw(st.sampled_from(sorted(n for n in members if n.endswith(".json"))))
    doc = json.loads(members[name])
    path = data.draw(st.sampled_from(list(_paths(doc))))
    action = data.draw(st.sampled_from(["replace", "delete"] if path else ["replace"]))
    new = data.draw(json_values) if action == "replace" else None
    edited = _edit(doc, path, action, new)
    assume(edited != doc)
    members[name] = json.dumps(edited).encode()
    snap = load_or_error(_zip(members))
    if snap is not None:
        assert_drawable(snap)


@FUZZ
@given(data=st.data())
def test_array_references_edited(raw, data):
    """An array's declared shape or dtype changed, or the reference pointed elsewhere."""
    members = _members(raw)
    name = data.draw(st.sampled_from(sorted(n for n in members if n.startswith("results/"))))
    doc = json.loads(members[name])
    refs = [p for p in _paths(doc) if p and p[-1] == "$array"]
    assume(refs)
    ref = data.draw(st.sampled_from(refs))[:-1]
    node = doc
    for key in ref:
        node = node[key]
    field = data.draw(st.sampled_from(["shape", "dtype", "$array"]))
    node[field] = data.draw({
        "shape": st.lists(st.integers(0, 40), max_size=4),
        "dtype": st.sampled_from(["<f4", "<f8", "<i8", "<U3", "|b1", "|O", "<c8"]),
        "$array": st.sampled_from(sorted(n for n in members if n.endswith(".npy")) + ["../../etc/passwd.npy"]),
    }[field])
    members[name] = json.dumps(doc).encode()
    snap = load_or_error(_zip(members))
    if snap is not None:
        assert_drawable(snap)


@FUZZ
@given(data=st.data())
def test_arrays_replaced(raw, data):
    """A different array in an array's place: another shape, dtype, or its header consistently edited."""
    members = _members(raw)
    name = data.draw(st.sampled_from(sorted(n for n in members if n.endswith(".npy"))))
    shape = tuple(data.draw(st.lists(st.integers(0, 6), max_size=3)))
    dtype = data.draw(st.sampled_from(["float32", "float64", "int64", "<U4", "bool"]))
    array = np.zeros(shape, dtype=dtype)
    members[name] = _npy(array)
    if data.draw(st.booleans()):  # make the reference agree, so only the result's own shape checks remain
        for json_name in [n for n in members if n.startswith("results/")]:
            doc = json.loads(members[json_name])
            for p in _paths(doc):
                if p and p[-1] == "$array":
                    node = doc
                    for key in p[:-1]:
                        node = node[key]
                    if node["$array"] == name:
                        node.update(shape=list(array.shape), dtype=array.dtype.str)
            members[json_name] = json.dumps(doc).encode()
    snap = load_or_error(_zip(members))
    if snap is not None:
        assert_drawable(snap)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_array_values_scrambled_still_show(raw, data):
    """Right shapes, arbitrary values (NaN, inf, huge): the loader cannot judge values, so the view
    must still show every result (charts, or the field table where a chart cannot be drawn)."""
    members = _members(raw)
    name = data.draw(st.sampled_from(sorted(n for n in members if n.endswith(".npy"))))
    array = np.load(io.BytesIO(members[name]), allow_pickle=False)
    if array.dtype.kind == "f" and array.size:
        values = data.draw(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32),
                                    min_size=array.size, max_size=array.size))
        array = np.array(values, dtype=array.dtype).reshape(array.shape)
    elif array.dtype.kind == "i" and array.size:
        values = data.draw(st.lists(st.integers(-2**40, 2**40), min_size=array.size, max_size=array.size))
        array = np.array(values, dtype=array.dtype).reshape(array.shape)
    members[name] = _npy(array)
    snap = load_or_error(_zip(members))
    if snap is not None:
        entry = snap.entries[int(name.split("/")[1][1:4])]  # arrays/r007.… belongs to result 7
        figures = export.figures_for(entry.result, snap.model)
        assert figures and all(caption for caption, _ in figures)
        view = SnapshotView(Snapshot(snap.manifest, (entry,)))
        assert len([o for o in view._layout.objects if isinstance(o, pn.Card)]) == 1
        assert pn.panel(view).get_root(Document()) is not None


@FUZZ
@given(version=json_values)
def test_unknown_schema_version(raw, version):
    assume(version != 1 or isinstance(version, bool))
    members = _members(raw)
    manifest = json.loads(members["manifest.json"])
    manifest["schema_version"] = version
    members["manifest.json"] = json.dumps(manifest).encode()
    with pytest.raises(SnapshotError, match="schema version"):
        read_snapshot(_zip(members))


# ------------------------------------------------------------------ pickles
class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["object npy", "pkl member", "pickle as npy", "structured object npy"])
def test_pickles_are_refused_and_never_run(raw, tmp_path, how):
    marker = tmp_path / "pwned"
    members = _members(raw)
    target = sorted(n for n in members if n.endswith(".npy"))[0]
    payload = _Payload(str(marker))
    if how == "object npy":
        members[target] = _npy(np.array([payload], dtype=object), allow_pickle=True)
    elif how == "pkl member":
        members["results/extra.pkl"] = pickle.dumps(payload)
    elif how == "pickle as npy":
        members[target] = pickle.dumps(payload)
    else:
        members[target] = _npy(np.array([(1, payload)], dtype=[("a", "i4"), ("b", "O")]), allow_pickle=True)
    path = tmp_path / "evil.zip"
    path.write_bytes(_zip(members))
    with pytest.raises(SnapshotError) as info:
        load_snapshot(path)
    assert ("pickled" in str(info.value) or "not a valid .npy" in str(info.value)) and target in str(info.value) \
        or "extra.pkl" in str(info.value)
    assert not marker.exists()
