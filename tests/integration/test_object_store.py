"""One suite, every backend: LocalObjectStore and S3ObjectStore against moto's HTTP server."""

from __future__ import annotations

import hashlib
import os

import pytest

from storage.errors import IntegrityError, InvalidName, ObjectExists, ObjectNotFound
from storage.objects import has_digest


def _file(tmp_path, name="blob", size=1000):  # type: ignore[no-untyped-def]
    p = tmp_path / name
    p.write_bytes(os.urandom(size))
    return p


def test_round_trip_with_digest(object_store, tmp_path):
    src = _file(tmp_path)
    put = object_store.put_file(src, "a/b/blob.bin")
    assert put.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    assert put.size == 1000
    dest = tmp_path / "out" / "blob.bin"
    object_store.get_file("a/b/blob.bin", dest, sha256=put.sha256, size=put.size)
    assert dest.read_bytes() == src.read_bytes()
    assert object_store.exists("a/b/blob.bin")
    assert object_store.stat("a/b/blob.bin").size == 1000
    with object_store.open("a/b/blob.bin") as fh:
        assert fh.read() == src.read_bytes()
    assert has_digest(object_store, "a/b/blob.bin", put.sha256)
    assert not has_digest(object_store, "a/b/blob.bin", "0" * 64)


def test_multipart_sized_file_hashes_exactly_what_was_sent(object_store, tmp_path):
    src = _file(tmp_path, size=20 * 1024 * 1024 + 123)  # > 2 multipart chunks on S3
    put = object_store.put_file(src, "big/blob")
    assert put.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    object_store.get_file("big/blob", tmp_path / "big.out", sha256=put.sha256, size=put.size)
    assert (tmp_path / "big.out").read_bytes() == src.read_bytes()


def test_keys_are_immutable(object_store, tmp_path):
    object_store.put_file(_file(tmp_path, "one"), "k/v")
    with pytest.raises(ObjectExists):
        object_store.put_file(_file(tmp_path, "two"), "k/v")


def test_digest_mismatch_leaves_nothing(object_store, tmp_path):
    object_store.put_file(_file(tmp_path), "k/v")
    out_dir = tmp_path / "dl"
    with pytest.raises(IntegrityError, match="SHA-256 mismatch"):
        object_store.get_file("k/v", out_dir / "v", sha256="0" * 64)
    assert list(out_dir.iterdir()) == []
    with pytest.raises(IntegrityError, match="bytes"):
        object_store.get_file("k/v", out_dir / "v", size=999)
    assert list(out_dir.iterdir()) == []


def test_list_delete_and_missing(object_store, tmp_path):
    for key in ("p/a", "p/b", "q/c"):
        object_store.put_file(_file(tmp_path, key.replace("/", "_")), key)
    assert [o.key for o in object_store.list("p/")] == ["p/a", "p/b"]
    assert all(o.modified is not None for o in object_store.list())
    object_store.delete("p/a")
    object_store.delete("p/a")  # harmless twice
    assert not object_store.exists("p/a")
    with pytest.raises(ObjectNotFound):
        object_store.get_file("p/a", tmp_path / "x")
    with pytest.raises(ObjectNotFound):
        object_store.stat("p/a")


@pytest.mark.parametrize(
    "key", ["../escape", "/abs/key", "a//b", "a/../b", "a/./b", "", "a/.hidden"]
)
def test_unsafe_keys_are_refused(object_store, tmp_path, key):
    with pytest.raises(InvalidName):
        object_store.put_file(_file(tmp_path), key)
