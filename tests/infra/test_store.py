"""The artifact store, against a local directory and a real S3 server (moto over HTTP)."""
from __future__ import annotations

import hashlib
import os
import pickle

import boto3
import pytest

from opdflow.infra.artifacts.store import (
    ChecksumError, InvalidKey, LocalStore, MiB, ObjectMissing, S3Store, Store, StoreError,
    open_store, sha256_bytes, sha256_file, validate_key, validate_run_id,
)

BAD_KEYS = ["", "/abs/key", "a/../b", "..", "a/./b", ".", "a//b", "a/b/", "a\\b", "a\x00b"]
GOOD_KEYS = ["a", "runs/r1/run.json", "a/.hidden", "a/..b", "a/b..", "x-y_z.1/ü"]


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return open_store(request.getfixturevalue("s3_store_uri"))


def overwrite_behind_the_store(store: Store, key: str, data: bytes) -> None:
    """Change an object's bytes without going through the store (disk rot, a stray writer)."""
    if isinstance(store, LocalStore):
        store.local_path(key).write_bytes(data)
    else:
        boto3.client("s3").put_object(Bucket=store.bucket, Key=f"{store.prefix}/{key}", Body=data)


def test_bytes_round_trip(store):
    sha = store.put_bytes("runs/r1/run.json", b'{"a": 1}')
    assert sha == hashlib.sha256(b'{"a": 1}').hexdigest() == sha256_bytes(b'{"a": 1}')
    assert store.get_bytes("runs/r1/run.json") == b'{"a": 1}'
    assert store.get_bytes("runs/r1/run.json", sha256=sha) == b'{"a": 1}'
    assert store.get_bytes("runs/r1/run.json", sha256=sha.upper()) == b'{"a": 1}'
    assert store.exists("runs/r1/run.json")
    store.put_bytes("runs/r1/run.json", b"")  # overwrite, and empty objects are fine
    assert store.get_bytes("runs/r1/run.json", sha256=sha256_bytes(b"")) == b""


def test_file_round_trip(store, tmp_path):
    src = tmp_path / "weights.bin"
    src.write_bytes(os.urandom(300_000))
    sha = store.put_file("runs/r1/stages/train/ckpt/model.safetensors", src)
    assert sha == sha256_file(src)
    dest = tmp_path / "out" / "nested" / "model.safetensors"
    got = store.get_file("runs/r1/stages/train/ckpt/model.safetensors", dest, sha256=sha)
    assert got == dest and dest.read_bytes() == src.read_bytes()
    assert os.listdir(dest.parent) == ["model.safetensors"]  # no temp file left behind


def test_checksum_error_names_key_and_digests(store, tmp_path):
    key = "runs/r1/stages/rollout/responses.parquet"
    sha = store.put_bytes(key, b"good bytes")
    overwrite_behind_the_store(store, key, b"rotten bytes")
    with pytest.raises(ChecksumError) as e:
        store.get_bytes(key, sha256=sha)
    actual = sha256_bytes(b"rotten bytes")
    assert key in str(e.value) and sha in str(e.value) and actual in str(e.value)
    assert (e.value.key, e.value.expected, e.value.actual) == (key, sha, actual)

    dest = tmp_path / "dl" / "responses.parquet"
    dest.parent.mkdir()
    dest.write_bytes(b"previous copy")
    with pytest.raises(ChecksumError, match="responses.parquet"):
        store.get_file(key, dest, sha256=sha)
    assert dest.read_bytes() == b"previous copy"  # a bad download never replaces the destination
    assert os.listdir(dest.parent) == ["responses.parquet"]
    assert store.get_bytes(key) == b"rotten bytes"  # no sha256 given: no check


def test_missing_object(store, tmp_path):
    for read in (lambda: store.get_bytes("runs/r1/nope.json"),
                 lambda: store.get_file("runs/r1/nope.json", tmp_path / "nope.json")):
        with pytest.raises(ObjectMissing, match="runs/r1/nope.json"):
            read()
    assert not (tmp_path / "nope.json").exists()
    assert not store.exists("runs/r1/nope.json")
    store.delete("runs/r1/nope.json")  # absent: no error
    store.put_bytes("runs/r1/dir/x", b"x")
    with pytest.raises(ObjectMissing):  # a "directory" is not an object
        store.get_bytes("runs/r1/dir")


def test_list_delete_and_delete_prefix(store):
    keys = ["runs/a/run.json", "runs/a/stages/s/1.bin", "runs/a/stages/s/2.bin", "runs/ab/run.json", "top.txt"]
    for k in reversed(keys):
        store.put_bytes(k, k.encode())
    assert store.list() == keys
    assert store.list("runs/a/") == keys[:3]
    assert store.list("runs/a") == keys[:4]  # a plain string prefix
    assert store.list("runs/a/stages/s/1") == ["runs/a/stages/s/1.bin"]
    assert store.list("nothing/here/") == []

    store.delete("top.txt")
    assert not store.exists("top.txt") and "top.txt" not in store.list()
    assert store.delete_prefix("runs/a/stages/") == 2
    assert store.list() == ["runs/a/run.json", "runs/ab/run.json"]
    assert store.delete_prefix("runs/a/stages/") == 0
    with pytest.raises(InvalidKey, match="refusing"):
        store.delete_prefix("")
    with pytest.raises(InvalidKey):
        store.list("../")


@pytest.mark.parametrize("key", BAD_KEYS)
def test_invalid_keys_are_refused(store, key):
    with pytest.raises(InvalidKey) as e:
        validate_key(key)
    assert repr(key) in str(e.value)
    assert isinstance(e.value, ValueError) and isinstance(e.value, StoreError)
    for op in (lambda: store.put_bytes(key, b"x"), lambda: store.get_bytes(key),
               lambda: store.exists(key), lambda: store.delete(key)):
        with pytest.raises(InvalidKey):
            op()


@pytest.mark.parametrize("key", GOOD_KEYS)
def test_valid_keys(key):
    assert validate_key(key) == key


def test_run_ids():
    for ok in ["r1", "2024-05-01_run.3", "A" * 128]:
        assert validate_run_id(ok) == ok
    for bad in ["", ".", "..", ".hidden", "-x", "a/b", "a b", "a\\b", "A" * 129, "ü"]:
        with pytest.raises(InvalidKey, match="run id"):
            validate_run_id(bad)


def test_local_store_layout(tmp_path):
    store = LocalStore(tmp_path / "new" / "root")  # the root is created
    store.put_bytes("a/b.txt", b"x")
    assert store.local_path("a/b.txt") == tmp_path / "new" / "root" / "a" / "b.txt"
    assert store.describe("a/b.txt") == str(tmp_path / "new" / "root" / "a" / "b.txt")
    (tmp_path / "new" / "root" / "a" / ".opdflow-tmp-0123").write_bytes(b"crashed writer")
    assert store.list() == ["a/b.txt"]  # temp files of unfinished writes are never listed
    with pytest.raises(InvalidKey):
        store.put_bytes("a/.opdflow-tmp-0123", b"x")
    store.check()
    store.delete("a/b.txt")
    assert not (tmp_path / "new" / "root" / "a" / "b.txt").exists()


def test_open_store_round_trip(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel = open_store("rel/store")
    assert isinstance(rel, LocalStore) and rel.root == tmp_path / "rel" / "store"
    spaced = open_store(str(tmp_path / "with space %"))
    assert spaced.uri.startswith("file:///") and " " not in spaced.uri
    for s in (rel, spaced, open_store(tmp_path / "p"), open_store(f"file://{tmp_path}/q")):
        again = open_store(s.uri)
        assert again == s and again.root == s.root and again.uri == s.uri
    s3 = open_store("s3://bucket/some/prefix/")
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix, s3.uri) == ("bucket", "some/prefix", "s3://bucket/some/prefix")
    assert open_store(s3.uri) == s3 and open_store("s3://bucket").uri == "s3://bucket"
    assert s3.describe("runs/r1/x") == "s3://bucket/some/prefix/runs/r1/x" and s3.local_path("x") is None
    with pytest.raises(StoreError, match="unsupported"):
        open_store("gs://bucket/x")
    with pytest.raises(InvalidKey):
        open_store("s3://bucket/a/../b")


@pytest.mark.integration
def test_s3_store_pickles(s3_store_uri):
    store = open_store(s3_store_uri)
    store.put_bytes("k", b"v")
    copy = pickle.loads(pickle.dumps(store))  # e.g. shipped to a Dask worker
    assert copy == store and copy.get_bytes("k") == b"v"


@pytest.mark.integration
def test_s3_multipart_upload(s3_store_uri, tmp_path):
    base = open_store(s3_store_uri)
    store = S3Store(base.bucket, base.prefix, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(11 * MiB))
    sha = store.put_file("big.bin", src)
    etag = boto3.client("s3").head_object(Bucket=store.bucket, Key=f"{store.prefix}/big.bin")["ETag"]
    assert etag.strip('"').endswith("-3")  # 5 + 5 + 1 MiB parts
    dest = store.get_file("big.bin", tmp_path / "back.bin", sha256=sha)
    assert sha256_file(dest) == sha == sha256_file(src)


@pytest.mark.integration
def test_s3_missing_bucket_is_named(s3_env):
    store = open_store("s3://opdflow-no-such-bucket/p")
    with pytest.raises(StoreError, match="opdflow-no-such-bucket") as e:
        store.put_bytes("k", b"v")
    assert "does not exist" in str(e.value) and not isinstance(e.value, ObjectMissing)
    with pytest.raises(StoreError, match="s3://opdflow-no-such-bucket/p"):
        store.check()


def test_check_passes(store):
    store.check()
    assert store.list() == []  # the probe leaves nothing behind
