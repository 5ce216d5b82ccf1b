"""Snapshots: exact round trips, and every corrupted input ends in a clear SnapshotError."""
from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from explorer.analyses.lens import CompareRequest, LensComparison, LensRequest, LensResult, compare_prompts, logit_lens
from explorer.persistence.snapshot import (
    Entry,
    SnapshotError,
    append_to_snapshot,
    load_snapshot,
    model_differences,
    model_identity,
    save_snapshot,
)
from explorer.training.swap import audit_swap


def assert_same(a, b):
    assert type(a) is type(b)
    da, db = a.to_dict(), b.to_dict()
    assert da == db
    for name, value in vars(a).items():
        if isinstance(value, np.ndarray):
            other = getattr(b, name)
            assert other.dtype == value.dtype and other.shape == value.shape and np.array_equal(other, value)


@pytest.fixture(scope="module")
def results(tiny_sessions):
    s = tiny_sessions["llama"]
    lens = logit_lens(s, LensRequest("The capital of France is", top_k=3))
    comp = compare_prompts(s, CompareRequest("one two three", "four five six seven eight", top_k=2))
    audit = audit_swap(["He said his son left.", "nothing here"])
    return [lens, comp, s.info(), audit]


@pytest.fixture()
def snapshot_file(tmp_path, results, tiny_sessions):
    return save_snapshot(tmp_path / "s.zip", [Entry(f"r{i}", r) for i, r in enumerate(results)],
                         model_identity(tiny_sessions["llama"]))


def test_round_trip_every_result_type(snapshot_file, results, tiny_sessions):
    snap = load_snapshot(snapshot_file)
    assert [e.label for e in snap.entries] == ["r0", "r1", "r2", "r3"]
    for saved, loaded in zip(results, snap.results):
        assert_same(saved, loaded)
    assert isinstance(snap.results[1], LensComparison) and isinstance(snap.results[1].a, LensResult)
    assert snap.manifest["schema_version"] == 1 and "torch" in snap.manifest["packages"]
    assert model_differences(snap.model, model_identity(tiny_sessions["llama"])) == []
    diffs = model_differences(snap.model, model_identity(tiny_sessions["gpt2"]))
    assert any(d.startswith("name") for d in diffs) and any(d.startswith("weights_hash") for d in diffs)


def test_append_creates_then_extends(tmp_path, results):
    path = tmp_path / "a.zip"
    append_to_snapshot(path, results[0], "first")
    append_to_snapshot(path, results[2], "second")
    assert [e.label for e in load_snapshot(path).entries] == ["first", "second"]


def _rewrite(src, dst, edit):
    """Copy a zip, letting edit(name, bytes) return new bytes or None to drop the member."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = edit(item.filename, zin.read(item.filename))
            if data is not None:
                zout.writestr(item.filename, data)
    return dst


def _npy(array, allow_pickle=False):
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


@pytest.mark.parametrize("edit, message", [
    (lambda n, d: None if n == "manifest.json" else d, "missing manifest.json"),
    (lambda n, d: json.dumps({**json.loads(d), "schema_version": 99}).encode() if n == "manifest.json" else d,
     "schema version 99"),
    (lambda n, d: None if n.endswith("top_probs.npy") else d, "missing the array"),
    (lambda n, d: _npy(np.zeros((2, 2), np.float32)) if n.endswith("r000.top_probs.npy") else d, "has shape"),
    (lambda n, d: _npy(np.array([{"x": 1}], dtype=object), allow_pickle=True) if n.endswith("r000.entropy.npy")
     else d, "pickled"),
    (lambda n, d: b"{not json" if n.startswith("results/r000") else d, "not valid JSON"),
    (lambda n, d: json.dumps({**json.loads(d), "type": "Evil"}).encode() if n.startswith("results/r000") else d,
     "unknown result type"),
])
def test_bad_snapshots_name_the_problem(snapshot_file, tmp_path, edit, message):
    bad = _rewrite(snapshot_file, tmp_path / "bad.zip", edit)
    with pytest.raises(SnapshotError, match=message):
        load_snapshot(bad)


def test_pickle_member_is_refused(snapshot_file, tmp_path):
    bad = tmp_path / "p.zip"
    bad.write_bytes(snapshot_file.read_bytes())
    with zipfile.ZipFile(bad, "a") as zf:
        zf.writestr("payload.pkl", b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(SnapshotError, match="pickled files"):
        load_snapshot(bad)


def test_not_a_zip_and_missing_file(tmp_path):
    (tmp_path / "x.zip").write_text("hello")
    with pytest.raises(SnapshotError, match="not a readable zip"):
        load_snapshot(tmp_path / "x.zip")
    with pytest.raises(SnapshotError, match="no snapshot file"):
        load_snapshot(tmp_path / "nope.zip")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_corruption_ends_in_snapshot_error(snapshot_file, tmp_path, data):
    raw = bytearray(snapshot_file.read_bytes())
    kind = data.draw(st.sampled_from(["truncate", "flip", "splice"]))
    if kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "flip":
        for _ in range(data.draw(st.integers(1, 20))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= data.draw(st.integers(1, 255))
    else:
        i = data.draw(st.integers(0, len(raw)))
        raw[i:i] = data.draw(st.binary(min_size=1, max_size=64))
    bad = tmp_path / "h.zip"
    bad.write_bytes(bytes(raw))
    try:
        load_snapshot(bad)  # a harmless corruption (e.g. in unused bytes) may still load
    except SnapshotError:
        pass


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                         lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                         max_leaves=12))
def test_any_result_json_ends_in_snapshot_error(snapshot_file, tmp_path, body):
    bad = _rewrite(snapshot_file, tmp_path / "j.zip",
                   lambda n, d: json.dumps(body).encode() if n.startswith("results/r000") else d)
    try:
        load_snapshot(bad)
    except SnapshotError:
        pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_field_replaced_ends_in_snapshot_error(snapshot_file, tmp_path, data):
    with zipfile.ZipFile(snapshot_file) as zf:
        body = json.loads(zf.read("results/r000.json"))
    field = data.draw(st.sampled_from(sorted(k for k in body if k != "type")))
    body[field] = data.draw(st.none() | st.integers() | st.text(max_size=4) | st.lists(st.integers(), max_size=3)
                            | st.fixed_dictionaries({"$array": st.text(max_size=12)}))
    bad = _rewrite(snapshot_file, tmp_path / "f.zip",
                   lambda n, d: json.dumps(body).encode() if n == "results/r000.json" else d)
    try:
        load_snapshot(bad)
    except SnapshotError:
        pass


def test_every_result_module_is_registered_for_loading():
    """A fresh process must know every result type a snapshot can hold."""
    import importlib
    import pkgutil

    import explorer
    from explorer.core.results import Result
    from explorer.persistence.snapshot import RESULT_MODULES

    defining = set()
    for info in pkgutil.walk_packages(explorer.__path__, "explorer."):
        if info.name.rpartition(".")[2].startswith("_"):  # __main__ runs the CLI on import
            continue
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Result) and obj is not Result \
                    and obj.__module__ == module.__name__:
                defining.add(info.name.removeprefix("explorer."))
    assert defining <= set(RESULT_MODULES), defining - set(RESULT_MODULES)
