"""GradientStore faults: every file the store writes tampered with (chunks, every manifest field, accumulators,
the fill lock) gives a named error, never a silent wrong answer; a manifest cannot make the store read, overwrite or
delete a file outside its folder; one writer at a time, with a stale lock taken over; the data fingerprint sees a
change in any example."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from _dist_lock_worker import run as lock_worker
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

from datatrace.attributors.projected import ProjectedInfluence
from datatrace.data import as_data_source
from datatrace.errors import StoreCorruptedError, StoreLockedError, StoreMismatchError
from datatrace.fileio import sha256_file
from datatrace.projection import RandomProjector
from datatrace.projection.features import FeatureBlock, InMemoryFeatures
from datatrace.projection.fingerprint import DATA_FINGERPRINT_SCHEME, data_fingerprint
from datatrace.projection.lock import LOCK, UNREADABLE_GRACE_SECONDS, StoreLock
from datatrace.projection.manifest import store_file
from datatrace.projection.scoring import score_against_store, top_k_against_store
from datatrace.projection.store import GradientStore
from datatrace.tasks import ClassificationTask

FINGERPRINTS = {"model": "m" * 64, "data": {"n": 23, "sha256": "d" * 64}}
N, DIM, CHUNK = 23, 5, 4  # 6 chunks, the last one of 3 rows


def feats() -> torch.Tensor:
    return torch.randn(N, DIM, generator=torch.Generator().manual_seed(0))


def compute(start, stop):
    rows = feats()[start:stop]
    return rows, {"sum": rows.double().sum(0)}


def create(directory):
    return GradientStore.create(directory, n=N, dim=DIM, chunk_size=CHUNK, fingerprints=FINGERPRINTS)


@pytest.fixture
def store_dir(tmp_path):
    create(tmp_path / "store").fill(compute, progress=False)
    return tmp_path / "store"


def flip_last_byte(path):
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01  # one bit of the last number: the header still parses, the values are wrong
    path.write_bytes(bytes(raw))


def edit_manifest(directory, change):
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


# -- case 2: a damaged chunk or accumulator file is found before its numbers are used --------------------------------


@pytest.mark.parametrize("chunk", range(6))
def test_a_damaged_chunk_of_a_reused_store_is_refused_before_scoring(store_dir, chunk):
    flip_last_byte(store_dir / f"chunk-{chunk:06d}.npy")
    reused = create(store_dir).fill(compute, progress=False)  # reuse: nothing to compute
    query = torch.randn(2, DIM)
    for score in (
        lambda: score_against_store(query, reused),
        lambda: top_k_against_store(query, reused, 3),
        lambda: reused.to_tensor(),
    ):
        with pytest.raises(
            StoreCorruptedError, match=rf"chunk {chunk} .*chunk-{chunk:06d}\.npy has sha256.*Fix:"
        ):
            score()


def test_a_chunk_replaced_after_it_was_checked_is_checked_again(store_dir):
    store = GradientStore(store_dir)
    good = store.to_tensor().clone()  # every chunk hashed once here
    assert torch.equal(store.to_tensor(), good)  # and not again (same size, mtime, inode)
    path = store_dir / "chunk-000003.npy"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    time.sleep(0.01)
    tmp = store_dir / "replacement"
    tmp.write_bytes(bytes(raw))
    os.replace(tmp, path)  # a new inode and mtime
    with pytest.raises(StoreCorruptedError, match=r"chunk-000003\.npy has sha256"):
        store.chunk(3)


def test_damaged_accumulators_are_refused_on_reuse(store_dir):
    (acc,) = store_dir.glob("accumulators-*.safetensors")
    flip_last_byte(acc)
    reused = create(store_dir).fill(compute, progress=False)
    with pytest.raises(StoreCorruptedError, match=rf"the accumulators .*{acc.name} has sha256.*Fix:"):
        reused.accumulator("sum")


def test_damaged_accumulators_are_refused_when_resuming(tmp_path):
    store = create(tmp_path / "s")
    for chunk in (0, 1):
        store.write_chunk(chunk, *compute(*store.rows(chunk)))
    (acc,) = (tmp_path / "s").glob("accumulators-*.safetensors")
    flip_last_byte(acc)
    with pytest.raises(StoreCorruptedError, match=rf"{acc.name} has sha256"):
        create(tmp_path / "s").fill(compute, progress=False)
    assert acc.exists()  # the damaged sums were neither used nor replaced


@pytest.mark.parametrize("name", ["chunk-000002.npy", "accumulators"])
def test_a_recorded_file_that_is_gone_is_named_on_reuse(store_dir, name):
    path = next(store_dir.glob("accumulators-*")) if name == "accumulators" else store_dir / name
    path.unlink()
    with pytest.raises(StoreCorruptedError, match=rf"missing \({path.name}\)"):
        create(store_dir)


def test_a_store_written_here_is_not_hashed_again(store_dir, monkeypatch):
    store = create(store_dir.parent / "fresh").fill(compute, progress=False)
    calls = []
    monkeypatch.setattr("datatrace.projection.manifest.sha256_file", lambda p: calls.append(p) or "")
    assert torch.equal(store.to_tensor(), feats()) and store.accumulator("sum").shape == (DIM,)
    assert calls == []  # this process wrote every file: their digests are known


# -- cases 3 and 17: the manifest is checked whole on every open ------------------------------------------------------


def _drop(key):
    return lambda m: m.pop(key)


def _set(key, value):
    return lambda m: m.__setitem__(key, value)


def _chunk(field, value, chunk="1"):
    return lambda m: m["chunks"][chunk].__setitem__(field, value)


def _acc(field, value):
    return lambda m: m["accumulators"].__setitem__(field, value)


def _uncover(m):  # n_chunks that does not cover n: chunk 5 (rows 20:23) forgotten, store "complete"
    m["n_chunks"] = 5
    m["chunks"].pop("5")


MANIFEST_FAULTS = {
    **{
        f"missing {key}": (_drop(key), "lacks the field" if key not in ("format", "version") else key)
        for key in (
            "format",
            "version",
            "n",
            "dim",
            "dtype",
            "chunk_size",
            "n_chunks",
            "fingerprints",
            "metadata",
            "chunks",
            "accumulators",
            "complete",
        )
    },
    "format": (_set("format", "other"), "format='other'"),
    "version text": (_set("version", "1"), "version='1' is not an integer"),
    "n text": (_set("n", "23"), "n='23' is not a positive integer"),
    "n bool": (_set("n", True), "n=True is not a positive integer"),
    "n bigger": (_set("n", 30), "n_chunks=6, but chunks of 4 rows cover n=30 rows in exactly 8"),
    "dim zero": (_set("dim", 0), "dim=0"),
    "dtype": (_set("dtype", "int8"), "dtype='int8' is not one of"),
    "chunk_size float": (_set("chunk_size", 4.0), "chunk_size=4.0"),
    "n_chunks short": (_uncover, "n_chunks=5, but chunks of 4 rows cover n=23 rows in exactly 6"),
    "n_chunks long": (_set("n_chunks", 7), "n_chunks=7"),
    "fingerprints": (_set("fingerprints", []), "fingerprints is a list"),
    "metadata": (_set("metadata", "x"), "metadata is a str"),
    "chunks list": (_set("chunks", []), "chunks is a list"),
    "chunk key": (lambda m: m["chunks"].__setitem__("9", m["chunks"]["1"]), "key '9'"),
    "chunk key padded": (lambda m: m["chunks"].__setitem__("01", m["chunks"].pop("1")), "key '01'"),
    "chunk entry": (lambda m: m["chunks"].__setitem__("1", "chunk-000001.npy"), r"chunks\['1'\]="),
    "chunk entry keys": (lambda m: m["chunks"]["1"].pop("sha256"), r"chunks\['1'\]=.*not an object"),
    "chunk other file": (_chunk("file", "chunk-000002.npy"), "may only be the file 'chunk-000001.npy'"),
    "chunk rows": (_chunk("rows", 3), r"chunks\['1'\].rows=3, but chunk 1 holds 4 rows"),
    "last chunk rows": (_chunk("rows", 4, "5"), r"chunks\['5'\].rows=4, but chunk 5 holds 3 rows"),
    "chunk sha256": (_chunk("sha256", "zz"), r"chunks\['1'\].sha256='zz' is not a sha256"),
    "accumulators type": (_set("accumulators", "x"), "accumulators='x'"),
    "accumulators names": (_acc("names", "sum"), "accumulators.names='sum'"),
    "accumulators sha256": (_acc("sha256", 5), "accumulators.sha256=5"),
    "accumulators file": (_acc("file", "model.safetensors"), "accumulators.file='model.safetensors'"),
    "complete false": (_set("complete", False), "complete=False, but 6 of its 6 chunks"),
    "complete text": (_set("complete", "yes"), "complete='yes'"),
    "complete early": (lambda m: (m["chunks"].pop("2"), m.__setitem__("complete", True)), "5 of its 6"),
}


@pytest.mark.parametrize("fault", sorted(MANIFEST_FAULTS))
def test_every_manifest_field_is_checked_on_open(store_dir, fault):
    change, match = MANIFEST_FAULTS[fault]
    edit_manifest(store_dir, change)
    for open_it in (lambda: GradientStore(store_dir), lambda: create(store_dir)):
        with pytest.raises(StoreCorruptedError, match=match) as info:
            open_it()
        message = str(info.value)
        assert "manifest.json is damaged" in message and "Fix: delete the directory" in message


@pytest.mark.parametrize(
    ("text", "match"),
    [("{", "cannot be read as JSON"), ("[1, 2]", "holds a JSON list"), ("null", "JSON NoneType")],
)
def test_a_manifest_that_is_not_a_json_object_is_named(store_dir, text, match):
    (store_dir / "manifest.json").write_text(text)
    with pytest.raises(StoreCorruptedError, match=match):
        GradientStore(store_dir)


def test_a_manifest_of_another_format_version_says_so(store_dir):
    edit_manifest(store_dir, _set("version", 2))
    with pytest.raises(ValueError, match="store format version 2; this datatrace reads version 1"):
        GradientStore(store_dir)


class Gappy(InMemoryFeatures):
    """A feature source whose blocks skip rows (as a manifest whose chunks did not cover n would)."""

    def blocks(self, chunks=None):
        for block in super().blocks(chunks):
            if block.chunk != 1:
                yield FeatureBlock(block.chunk, block.start, block.values)


def test_scores_never_hold_columns_no_chunk_covered():
    source = Gappy(feats(), block_rows=CHUNK)
    with pytest.raises(StoreCorruptedError, match=r"n=23 rows but their chunks cover rows 0:4 and then 8:12"):
        score_against_store(torch.randn(2, DIM), source)


# -- case 9: no path from a manifest leads outside the store ----------------------------------------------------------


def test_a_chunk_outside_the_store_is_never_read(store_dir):
    outside = store_dir.parent / "outside.npy"
    np.save(outside, np.full((CHUNK, DIM), 7.0, np.float32))  # a valid chunk, with its true digest
    edit_manifest(
        store_dir,
        lambda m: m["chunks"]["0"].update({"file": "../outside.npy", "sha256": sha256_file(outside)}),
    )
    with pytest.raises(StoreCorruptedError, match=r"chunks\['0'\].file='../outside.npy'"):
        score_against_store(torch.randn(2, DIM), GradientStore(store_dir))
    edit_manifest(store_dir, lambda m: m["chunks"]["0"].update({"file": "/etc/passwd"}))
    with pytest.raises(StoreCorruptedError, match="file='/etc/passwd'"):
        GradientStore(store_dir)
    assert outside.exists()


def test_a_chunk_that_links_outside_the_store_is_never_read(store_dir):
    outside = store_dir.parent / "outside.npy"
    shutil.copy(store_dir / "chunk-000000.npy", outside)  # same bytes, same digest
    (store_dir / "chunk-000000.npy").unlink()
    (store_dir / "chunk-000000.npy").symlink_to(outside)
    store = GradientStore(store_dir)
    with pytest.raises(StoreCorruptedError, match=r"'chunk-000000\.npy', which is not a plain file inside"):
        store.chunk(0)
    with pytest.raises(StoreCorruptedError, match="not a plain file inside"):
        store.verify()


@pytest.mark.parametrize(
    "name", ["../my_model.safetensors", "/tmp/my_model.safetensors", "sub/x.safetensors"]
)
def test_resuming_never_deletes_a_file_outside_the_store(tmp_path, name):
    store = create(tmp_path / "s")
    store.write_chunk(0, *compute(0, CHUNK))
    model_file = tmp_path / "my_model.safetensors"
    save_file({"sum": torch.zeros(DIM, dtype=torch.float64)}, str(model_file))  # readable as the running sums
    precious = model_file.read_bytes()
    target = name if not name.startswith("/tmp") else str(model_file)
    edit_manifest(tmp_path / "s", lambda m: m["accumulators"].update({"file": target}))
    with pytest.raises(StoreCorruptedError, match=r"accumulators.file=.*not the name of an accumulator file"):
        create(tmp_path / "s").fill(compute, progress=False)
    assert model_file.read_bytes() == precious


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "a\\b", "/etc/passwd", "x\0y", None, 3])
def test_store_file_accepts_only_plain_names_inside(tmp_path, name):
    with pytest.raises(StoreCorruptedError, match="not a plain file inside the store folder"):
        store_file(tmp_path, name)
    assert store_file(tmp_path, "chunk-000000.npy") == tmp_path / "chunk-000000.npy"


# -- case 10: one writer at a time --------------------------------------------------------------------------------------


def test_a_second_fill_is_refused_while_the_first_runs_and_then_reuses_its_chunks(tmp_path):
    started, go_on = threading.Event(), threading.Event()
    first_calls = []

    def slow(start, stop):
        first_calls.append(start)
        started.set()
        go_on.wait(30)
        return compute(start, stop)

    first = create(tmp_path / "s")
    second = create(tmp_path / "s")  # opened before the first fill wrote anything
    thread = threading.Thread(target=lambda: first.fill(slow, progress=False))
    thread.start()
    try:
        assert started.wait(30)
        second_calls = []
        with pytest.raises(
            StoreLockedError, match=rf"process {os.getpid()} on host '{socket.gethostname()}'"
        ):
            second.fill(lambda a, b: second_calls.append(a) or compute(a, b), progress=False)
        with pytest.raises(StoreLockedError, match="Fix: wait for that run to finish"):
            second.write_chunk(5, *compute(20, 23))
        assert second_calls == []
    finally:
        go_on.set()
        thread.join(30)
    assert first_calls == [0, 4, 8, 12, 16, 20] and not (tmp_path / "s" / LOCK).exists()
    again = []
    second.fill(lambda a, b: again.append(a) or compute(a, b), progress=False)
    assert again == [] and second.complete  # the lock's holder wrote them: read again under the lock
    assert torch.equal(second.to_tensor(), feats())


def test_the_lock_is_given_back_when_a_fill_stops(tmp_path):
    def failing(start, stop):
        if start == 8:
            raise KeyboardInterrupt
        return compute(start, stop)

    with pytest.raises(KeyboardInterrupt):
        create(tmp_path / "s").fill(failing, progress=False)
    assert not (tmp_path / "s" / LOCK).exists()
    assert create(tmp_path / "s").fill(compute, progress=False).complete


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(directory, pid, host, age=0.0, raw=None):
    path = directory / LOCK
    path.write_text(raw if raw is not None else json.dumps({"pid": pid, "host": host, "started_utc": "then"}))
    if age:
        past = time.time() - age
        os.utime(path, (past, past))
    return path


@pytest.mark.parametrize("kind", ["dead process here", "old heartbeat elsewhere", "unreadable and old"])
def test_a_stale_lock_is_taken_over(tmp_path, kind, caplog):
    store = create(tmp_path / "s")
    store.write_chunk(0, *compute(0, CHUNK))  # a crashed run: one chunk done, its lock left behind
    if kind == "dead process here":
        lock = _write_lock(tmp_path / "s", _dead_pid(), socket.gethostname())
    elif kind == "old heartbeat elsewhere":
        lock = _write_lock(tmp_path / "s", 1, "another-host", age=GradientStore.lock_stale_seconds + 60)
    else:
        lock = _write_lock(tmp_path / "s", 0, "", age=UNREADABLE_GRACE_SECONDS + 60, raw="")
    calls = []
    with caplog.at_level(logging.WARNING, logger="datatrace.projection.lock"):
        create(tmp_path / "s").fill(lambda a, b: calls.append(a) or compute(a, b), progress=False)
    assert calls == [4, 8, 12, 16, 20] and not lock.exists()
    assert "was stale" in caplog.text


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("live process elsewhere", "process 1 on host 'another-host'"),
        ("live process here", rf"process {os.getppid()} on host"),
        ("unreadable and new", "an unknown process"),
    ],
)
def test_a_live_lock_is_respected(tmp_path, kind, match):
    store = create(tmp_path / "s")
    if kind == "live process elsewhere":
        lock = _write_lock(tmp_path / "s", 1, "another-host", age=60)
    elif kind == "live process here":
        lock = _write_lock(tmp_path / "s", os.getppid(), socket.gethostname())
    else:
        lock = _write_lock(tmp_path / "s", 0, "", raw="{")
    with pytest.raises(StoreLockedError, match=match) as info:
        store.fill(compute, progress=False)
    assert str(lock) in str(info.value) and "delete the lock file" in str(info.value)
    assert lock.exists() and store.missing_chunks() == list(range(6))


def test_a_lock_stolen_meanwhile_is_put_back(tmp_path):
    lock = StoreLock(tmp_path)
    _write_lock(tmp_path, 12345, "h")
    judged = (tmp_path / LOCK).read_bytes()
    _write_lock(tmp_path, 777, "h")  # another process took it over between our read and our rename
    lock.break_stale(judged, "test")
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == 777
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK]


def test_a_complete_store_is_read_without_the_lock(store_dir):
    _write_lock(store_dir, 1, "another-host")  # a fill of something else may hold it: reading needs no lock
    assert create(store_dir).fill(compute, progress=False).complete


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_under_two_ranks_rank_0_alone_takes_the_lock(tmp_path):
    ctx = mp.start_processes(
        lock_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    stop = time.monotonic() + 120
    while not ctx.join(timeout=1.0):
        if time.monotonic() > stop:
            for process in ctx.processes:
                process.terminate()
            pytest.fail("the 2 gloo ranks did not finish within 120 s (a collective hung)")
    facts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert facts[0]["held"].startswith(f"StoreLockedError: the GradientStore in {str(tmp_path / 'store')!r}")
    assert f"process {os.getpid()} on host" in facts[0]["held"]
    assert facts[1]["held"].startswith("RuntimeError") and "rank 0" in facts[1]["held"]
    assert all(f["complete"] and f["equal"] and not f["lock_left"] for f in facts)


# -- case 5: the data fingerprint sees every example ------------------------------------------------------------------


def test_the_data_fingerprint_changes_with_any_example_and_not_with_the_form():
    X, y = torch.randn(1000, 3, generator=torch.Generator().manual_seed(0)), torch.arange(1000) % 2
    fp = data_fingerprint(as_data_source(TensorDataset(X, y), "train", 64))
    assert fp["scheme"] == DATA_FINGERPRINT_SCHEME and fp["n"] == 1000
    assert fp == data_fingerprint(as_data_source((X, y), "train", 100))  # tensors or Dataset, any batch size
    X2 = X.clone()
    X2[500, 1] += 1e-3  # far from the first and last 256 examples
    assert data_fingerprint(as_data_source(TensorDataset(X2, y), "train", 64)) != fp


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int64])
def test_in_memory_data_hashed_whole_equals_the_same_data_read_in_batches(dtype):
    X = (torch.randn(50, 2, 3, generator=torch.Generator().manual_seed(1)) * 10).to(dtype)
    y = torch.arange(50) % 3
    whole = as_data_source((X, y), "train", 7)
    assert whole.tensors is not None  # hashed whole, not batch by batch
    assert whole.content_sha256() == as_data_source(TensorDataset(X, y), "train", 7).content_sha256()
    X2 = X.clone()
    X2[25, 1, 2] += 1
    assert as_data_source((X2, y), "train", 7).content_sha256() != whole.content_sha256()


def test_a_store_with_an_old_data_fingerprint_is_refused_by_name(tmp_path):
    old = {**FINGERPRINTS, "data": {"n": N, "sha256": "d" * 64, "hashed": "first and last 256 examples"}}
    GradientStore.create(tmp_path / "s", n=N, dim=DIM, chunk_size=CHUNK, fingerprints=old)
    new = {**FINGERPRINTS, "data": {"scheme": DATA_FINGERPRINT_SCHEME, "n": N, "sha256": "d" * 64}}
    with pytest.raises(StoreMismatchError, match=r"another scheme: its 'data' fingerprint was made ") as info:
        GradientStore.create(tmp_path / "s", n=N, dim=DIM, chunk_size=CHUNK, fingerprints=new)
    assert "or delete the old store." in str(info.value) and "pass the original" not in str(info.value)


def test_projected_influence_never_reuses_features_of_a_changed_example(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    X, y = torch.randn(600, 3), torch.arange(600) % 2
    kwargs = {"projector": RandomProjector(dim=4), "store_dir": tmp_path / "s", "progress": False}
    task = ClassificationTask(weight_decay=1e-2)
    ProjectedInfluence(model, task, **kwargs).fit(TensorDataset(X, y))
    X2 = X.clone()
    X2[300] += 1.0  # one example in the middle
    with pytest.raises(StoreMismatchError, match="different training data"):
        ProjectedInfluence(model, task, **kwargs).fit(TensorDataset(X2, y))


def test_a_lock_that_cannot_be_written_is_not_left_behind(tmp_path, monkeypatch):
    def full_disk(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("datatrace.projection.lock.os.write", full_disk)
    with pytest.raises(OSError, match="No space left"):
        StoreLock(tmp_path).acquire()
    monkeypatch.undo()
    assert not (tmp_path / LOCK).exists()
    with StoreLock(tmp_path) as lock:
        assert lock.held and (tmp_path / LOCK).exists()
    assert not (tmp_path / LOCK).exists()


def test_chunks_read_ahead_come_in_order_and_a_reader_may_stop_early(store_dir):
    store = GradientStore(store_dir)
    blocks = store.blocks()
    first = next(blocks)
    blocks.close()  # the chunks opened ahead are waited for, not leaked
    assert (first.chunk, first.start) == (0, 0) and torch.equal(first.values, feats()[:CHUNK])
    assert [b.chunk for b in store.blocks([5, 1, 3])] == [5, 1, 3]
    flip_last_byte(store_dir / "chunk-000004.npy")
    seen = []
    with pytest.raises(StoreCorruptedError, match=r"chunk-000004\.npy"):
        for block in GradientStore(store_dir).blocks():
            seen.append(block.chunk)
    assert seen == [0, 1, 2, 3]  # every good chunk before the damaged one, then the error at its place
