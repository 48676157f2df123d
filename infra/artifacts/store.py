"""The artifact store: one interface over a local directory and S3.

Every stage reads its inputs from and writes its outputs to the store (DESIGN.md, "Contracts
between stages"), so a stage can rerun on another machine. This module is the only place
that touches the storage backend; everything above it speaks `Store`:

* **One interface.** `LocalStore` (a directory; the default, needs nothing installed) and
  `S3Store` (boto3; any S3-compatible server such as MinIO) offer the same methods. Pick one
  with `open_store(uri)`: `s3://bucket/prefix`, `file:///abs/path`, or a plain path.
  `store.uri` round-trips: `open_store(store.uri) == store`.
* **Checksums.** Every write returns the object's sha256; every read can take the expected
  sha256 and raises `ChecksumError` (naming the key, expected and actual digest) on a mismatch.
  The manifest records the digests; the store only computes and checks them.
* **Atomic local writes.** A local object is written to a temp file in the same directory,
  fsynced, then `os.replace`d, so a reader never sees half an object; `get_file` does the same
  at the destination and verifies the checksum before the rename. S3 PUTs are atomic already.
* **No commits here.** The store has no notion of a commit or of garbage: a stage commits by
  writing its manifest entry last (`opdflow.infra.artifacts.manifest`), and readers follow only
  committed entries.

Keys are relative POSIX paths (`runs/<run_id>/stages/...`), validated by `validate_key` so no
key can escape the store root. S3 endpoint, region and credentials come from the standard AWS
settings (`AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3`, `AWS_DEFAULT_REGION` / `AWS_REGION`,
`AWS_ACCESS_KEY_ID`, profiles, ...), which boto3 reads itself; transient errors are retried by
botocore's "standard" retry mode. The endpoint is not part of the URI.

    store = open_store("s3://my-bucket/opdflow")     # or open_store("./opdflow-store")
    sha = store.put_bytes("runs/r1/run.json", b"{}")
    data = store.get_bytes("runs/r1/run.json", sha256=sha)
"""
from __future__ import annotations

import hashlib
import os
import re
import secrets
from abc import ABC, abstractmethod
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator
from urllib.parse import unquote, urlparse

MiB = 1024 * 1024
_CHUNK = 1 * MiB
_TMP_PREFIX = ".opdflow-tmp-"  # local temp files; never listed, never valid object names
_MAX_KEY_BYTES = 1024  # S3's limit; applied to local keys too so both backends accept the same keys
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


# ----------------------------------------------------------------------------- errors

class StoreError(Exception):
    """Any store failure; the message always names the key or location."""


class StoreMissing(StoreError):
    """A local store directory that does not exist, opened by a command that only reads."""


class ObjectMissing(StoreError):
    """The object does not exist."""

    def __init__(self, key: str, location: str):
        super().__init__(f"no object {key!r} in the store (looked at {location})")
        self.key, self.location = key, location


class ChecksumError(StoreError):
    """The object's sha256 is not the expected one."""

    def __init__(self, key: str, location: str, expected: str, actual: str):
        super().__init__(f"checksum mismatch for {key!r} ({location}): "
                         f"expected sha256 {expected}, actual sha256 {actual}")
        self.key, self.location, self.expected, self.actual = key, location, expected, actual


class CorruptObject(StoreError):
    """An object that is present but cannot be parsed (truncated JSON, garbage Parquet): names its file."""

    def __init__(self, key: str, location: str, detail: str):
        super().__init__(f"cannot parse {key!r} ({location}): {detail}")
        self.key, self.location, self.detail = key, location, detail


class InvalidKey(StoreError, ValueError):
    """A key, prefix or run id that could escape the store root or is otherwise malformed."""


# ----------------------------------------------------------------------------- validation

def validate_key(key: str) -> str:
    """Return `key` if it is a relative POSIX key without '.', '..' or empty segments."""
    if not isinstance(key, str):
        raise InvalidKey(f"store key must be a str, got {type(key).__name__}: {key!r}")
    problem = None
    if not key:
        problem = "it is empty"
    elif "\x00" in key:
        problem = "it contains a NUL character"
    elif "\\" in key:
        problem = "it contains a backslash (use '/')"
    elif key.startswith("/"):
        problem = "it starts with '/' (keys are relative to the store root)"
    elif len(key.encode("utf-8", "surrogatepass")) > _MAX_KEY_BYTES:
        problem = f"it is longer than {_MAX_KEY_BYTES} bytes"
    else:
        for seg in key.split("/"):
            if seg in ("", ".", ".."):
                problem = f"it has an {'empty' if not seg else repr(seg)} path segment"
                break
    if problem:
        raise InvalidKey(f"invalid store key {key!r}: {problem}")
    return key


def _validate_prefix(prefix: str) -> str:
    """A prefix is '' or a key, optionally followed by '/'; it may end mid-segment."""
    if prefix == "":
        return prefix
    if not isinstance(prefix, str):
        raise InvalidKey(f"store prefix must be a str, got {type(prefix).__name__}: {prefix!r}")
    try:
        validate_key(prefix[:-1] if prefix.endswith("/") else prefix)
    except InvalidKey as e:
        raise InvalidKey(f"invalid store prefix {prefix!r}: {e}") from None
    return prefix


def validate_run_id(run_id: str) -> str:
    """Return `run_id` if it is `[A-Za-z0-9][A-Za-z0-9._-]{0,127}` (so one safe key segment)."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id) or run_id in (".", ".."):
        raise InvalidKey(f"invalid run id {run_id!r}: use 1-128 characters from A-Z a-z 0-9 . _ -, "
                         "starting with a letter or digit")
    return run_id


# ----------------------------------------------------------------------------- checksums

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    with open(path, "rb") as f:
        return _hash_stream(f)


def _hash_stream(f: IO[bytes]) -> str:
    h = hashlib.sha256()
    while chunk := f.read(_CHUNK):
        h.update(chunk)
    return h.hexdigest()


def _copy_hashing(src: IO[bytes], dst: IO[bytes]) -> str:
    h = hashlib.sha256()
    while chunk := src.read(_CHUNK):
        h.update(chunk)
        dst.write(chunk)
    return h.hexdigest()


@contextmanager
def _atomic_write(path: Path) -> Iterator[IO[bytes]]:
    """Open a temp file beside `path`; on success fsync it and rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode honours the umask
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- interface

class Store(ABC):
    """Objects addressed by relative POSIX keys. See the module docstring."""

    uri: str

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> str:
        """Write `data` at `key` (replacing any object there); return its sha256."""

    @abstractmethod
    def put_file(self, key: str, path: str | os.PathLike) -> str:
        """Upload the file at `path` to `key`; return its sha256."""

    @abstractmethod
    def get_bytes(self, key: str, sha256: str | None = None) -> bytes:
        """Read `key`; verify against `sha256` when given. Raises ObjectMissing, ChecksumError."""

    @abstractmethod
    def get_file(self, key: str, dest: str | os.PathLike, sha256: str | None = None) -> Path:
        """Stream `key` to `dest` (temp file then rename; verified before the rename)."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """All keys starting with `prefix` (a plain string prefix), recursive, sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete `key`; no error if it is absent."""

    @abstractmethod
    def describe(self, key: str) -> str:
        """Where `key` lives, for humans: an absolute path or s3://bucket/prefix/key."""

    @abstractmethod
    def check(self) -> None:
        """Raise StoreError naming the uri unless the store is reachable and writable."""

    def get_json(self, key: str, sha256: str | None = None):
        """Read and parse a JSON object; a parse error raises CorruptObject naming the file."""
        import json
        data = self.get_bytes(key, sha256=sha256)
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptObject(key, self.describe(key), f"not valid JSON ({e}; {len(data)} bytes)") from None

    def sha256(self, key: str) -> str:
        """The object's sha256, streamed (not held in memory). Raises ObjectMissing."""
        with self.open_stream(key) as f:
            return _hash_stream(f)

    @abstractmethod
    def open_stream(self, key: str):
        """A context manager giving a binary file-like object reading `key`. Raises ObjectMissing."""

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key starting with `prefix`; return how many. '' is refused."""
        if not prefix:
            raise InvalidKey(f"refusing to delete every object in {self.uri}: pass a non-empty prefix")
        keys = self.list(prefix)
        for key in keys:
            self.delete(key)
        return len(keys)

    def local_path(self, key: str) -> Path | None:
        """The object's file path for a local store; None for remote stores."""
        return None

    def _verify(self, key: str, expected: str | None, actual: str) -> None:
        if expected is not None and expected.lower() != actual:
            raise ChecksumError(key, self.describe(key), expected, actual)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.uri))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


# ----------------------------------------------------------------------------- local

class LocalStore(Store):
    """A directory; objects are files at `root/<key>`."""

    def __init__(self, root: str | os.PathLike, create: bool = True):
        self.root = Path(root).expanduser().resolve()
        if not create and not self.root.is_dir():  # reading commands never create a store to say "no run"
            raise StoreMissing(f"no store at {self.root} (the directory does not exist)")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create store directory {self.root}: {e}") from e
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        validate_key(key)
        if key.rsplit("/", 1)[-1].startswith(_TMP_PREFIX):
            raise InvalidKey(f"invalid store key {key!r}: names starting with {_TMP_PREFIX!r} are reserved")
        return self.root.joinpath(*key.split("/"))

    def put_bytes(self, key: str, data: bytes) -> str:
        path = self._path(key)
        with self._errors(key, "write"), _atomic_write(path) as f:
            f.write(data)
        return sha256_bytes(data)

    def put_file(self, key: str, path: str | os.PathLike) -> str:
        dest = self._path(key)
        with self._errors(key, "write"), open(path, "rb") as src, _atomic_write(dest) as f:
            return _copy_hashing(src, f)

    def get_bytes(self, key: str, sha256: str | None = None) -> bytes:
        path = self._path(key)
        with self._errors(key, "read"):
            data = path.read_bytes()
        self._verify(key, sha256, sha256_bytes(data))
        return data

    def get_file(self, key: str, dest: str | os.PathLike, sha256: str | None = None) -> Path:
        path, dest = self._path(key), Path(dest)
        with self._errors(key, "read"), open(path, "rb") as src, _atomic_write(dest) as f:
            # raising inside the block removes the temp file, so dest is never a bad copy
            self._verify(key, sha256, _copy_hashing(src, f))
        return dest

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    @contextmanager
    def open_stream(self, key: str):
        path = self._path(key)
        with self._errors(key, "read"):
            f = open(path, "rb")
        with f:
            yield f

    def list(self, prefix: str = "") -> list[str]:
        _validate_prefix(prefix)
        base = self.root.joinpath(*prefix.split("/")[:-1])  # deepest directory the prefix names
        keys = []
        for dirpath, _dirs, files in os.walk(base):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                key = name if rel == "." else f"{rel}/{name}"
                if not name.startswith(_TMP_PREFIX) and key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        with self._errors(key, "delete"):
            path.unlink(missing_ok=True)
        for parent in path.parents:  # prune directories the delete left empty
            if parent == self.root or self.root not in parent.parents:
                break
            try:
                parent.rmdir()
            except OSError:  # not empty (or already gone / raced with a writer): stop
                break

    def describe(self, key: str) -> str:
        return str(self._path(key))

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def check(self) -> None:
        if not self.root.is_dir():
            raise StoreError(f"store {self.uri}: {self.root} is not a directory")
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreError(f"store {self.uri}: directory {self.root} is not writable")

    @contextmanager
    def _errors(self, key: str, op: str) -> Iterator[None]:
        try:
            yield
        except FileNotFoundError as e:
            if op == "read" and not self._path(key).is_file():
                raise ObjectMissing(key, self.describe(key)) from None
            raise StoreError(f"cannot {op} {key!r} ({self.describe(key)}): {e}") from e
        except IsADirectoryError:
            raise ObjectMissing(key, self.describe(key)) from None
        except OSError as e:
            raise StoreError(f"cannot {op} {key!r} ({self.describe(key)}): {e}") from e


# ----------------------------------------------------------------------------- S3

_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}


class S3Store(Store):
    """Objects at `s3://bucket/prefix/<key>`; any S3-compatible server (endpoint from AWS settings).

    `multipart_threshold`: files at least this big are uploaded in parts of `multipart_chunksize`
    (S3's minimum part size is 5 MiB). The bucket's existence is checked once, on first use.
    """

    def __init__(self, bucket: str, prefix: str = "", client=None, *,
                 multipart_threshold: int = 64 * MiB, multipart_chunksize: int = 16 * MiB):
        if not bucket or "/" in bucket or not bucket.isprintable():
            raise StoreError(f"invalid S3 bucket name {bucket!r}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            validate_key(self.prefix)
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.multipart_threshold = multipart_threshold
        self.multipart_chunksize = multipart_chunksize
        self._client = client
        self._bucket_ok = False

    # boto3 clients do not pickle; a copy of the store makes its own client
    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None, "_bucket_ok": False}

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config
            self._client = boto3.session.Session().client("s3", config=Config(
                retries={"mode": "standard", "max_attempts": 5}, connect_timeout=10, read_timeout=120))
        return self._client

    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig
        return TransferConfig(multipart_threshold=self.multipart_threshold,
                              multipart_chunksize=self.multipart_chunksize, max_concurrency=4)

    def _key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _client_checked(self):
        """The client, after checking once that the bucket exists."""
        if not self._bucket_ok:
            with self._errors(None, "open bucket"):
                self.client.head_bucket(Bucket=self.bucket)
            self._bucket_ok = True
        return self.client

    def put_bytes(self, key: str, data: bytes) -> str:
        full, sha = self._key(key), sha256_bytes(data)
        client = self._client_checked()
        with self._errors(key, "write"):
            client.put_object(Bucket=self.bucket, Key=full, Body=data, Metadata={"sha256": sha})
        return sha

    def put_file(self, key: str, path: str | os.PathLike) -> str:
        full, sha = self._key(key), sha256_file(path)
        client = self._client_checked()
        with self._errors(key, "write"):
            client.upload_file(os.fspath(path), self.bucket, full, ExtraArgs={"Metadata": {"sha256": sha}},
                               Config=self._transfer_config())
        return sha

    def get_bytes(self, key: str, sha256: str | None = None) -> bytes:
        full = self._key(key)
        client = self._client_checked()
        with self._errors(key, "read"):
            data = client.get_object(Bucket=self.bucket, Key=full)["Body"].read()
        self._verify(key, sha256, sha256_bytes(data))
        return data

    def get_file(self, key: str, dest: str | os.PathLike, sha256: str | None = None) -> Path:
        full, dest = self._key(key), Path(dest)
        client = self._client_checked()
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
        try:
            with self._errors(key, "read"):  # ranged, parallel GETs above the multipart threshold
                client.download_file(self.bucket, full, os.fspath(tmp), Config=self._transfer_config())
            self._verify(key, sha256, sha256_file(tmp))
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    @contextmanager
    def open_stream(self, key: str):
        full = self._key(key)
        client = self._client_checked()
        with self._errors(key, "read"):
            body = client.get_object(Bucket=self.bucket, Key=full)["Body"]
        try:
            with self._errors(key, "read"):
                yield body
        finally:
            body.close()

    def exists(self, key: str) -> bool:
        full = self._key(key)
        client = self._client_checked()
        try:
            with self._errors(key, "stat"):
                client.head_object(Bucket=self.bucket, Key=full)
        except ObjectMissing:
            return False
        return True

    def list(self, prefix: str = "") -> list[str]:
        _validate_prefix(prefix)
        root = f"{self.prefix}/" if self.prefix else ""
        client = self._client_checked()
        keys = []
        with self._errors(prefix or None, "list"):
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=root + prefix):
                keys.extend(obj["Key"][len(root):] for obj in page.get("Contents", ()))
        return sorted(keys)

    def delete(self, key: str) -> None:
        full = self._key(key)
        client = self._client_checked()
        with self._errors(key, "delete"):
            client.delete_object(Bucket=self.bucket, Key=full)

    def delete_prefix(self, prefix: str) -> int:
        if not prefix:
            raise InvalidKey(f"refusing to delete every object in {self.uri}: pass a non-empty prefix")
        keys = self.list(prefix)
        client = self._client_checked()
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = keys[i:i + 1000]
            with self._errors(prefix, "delete"):
                resp = client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": self._key(k)} for k in batch], "Quiet": True})
            if resp.get("Errors"):
                err = resp["Errors"][0]
                raise StoreError(f"cannot delete {len(resp['Errors'])} objects under {self.uri}/{prefix}, "
                                 f"e.g. {err.get('Key')}: {err.get('Code')} {err.get('Message')}")
        return len(keys)

    def describe(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def check(self) -> None:
        """Check the bucket exists and accept a write under the prefix (a probe object, deleted)."""
        self._bucket_ok = False
        probe = f".opdflow-check/{secrets.token_hex(8)}"
        try:
            self.put_bytes(probe, b"")
            self.delete(probe)
        except StoreError as e:
            raise StoreError(f"store {self.uri} is not usable: {e}") from e

    @contextmanager
    def _errors(self, key: str | None, op: str) -> Iterator[None]:
        """Translate botocore errors into StoreErrors that name the bucket/key."""
        from botocore.exceptions import BotoCoreError, ClientError
        where = f"{self.uri}/{key}" if key else self.uri  # key may be a prefix: no validation here
        try:
            yield
        except ClientError as e:
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket" or (key is None and (code in _MISSING_CODES or status == 404)):
                raise StoreError(f"S3 bucket {self.bucket!r} does not exist (store {self.uri}); "
                                 "create it, or check the store URI and AWS_ENDPOINT_URL") from None
            if key is not None and (code in _MISSING_CODES or status == 404):
                raise ObjectMissing(key, where) from None
            if code in ("403", "AccessDenied", "Forbidden") or status == 403:
                raise StoreError(f"access denied to {where} ({op}): check the AWS credentials "
                                 f"and the bucket policy") from e
            raise StoreError(f"S3 {op} failed for {where}: {code} {err.get('Message', '')}".rstrip()) from e
        except BotoCoreError as e:  # no credentials, endpoint unreachable after retries, ...
            raise StoreError(f"S3 {op} failed for {where}: {e}") from e


# ----------------------------------------------------------------------------- opening

def open_store(uri: str | os.PathLike, create: bool = True) -> Store:
    """`s3://bucket/prefix` -> S3Store; `file:///abs/path` or a plain path -> LocalStore.
    `create=False`: a local directory that does not exist raises StoreMissing (nothing is created)."""
    if isinstance(uri, os.PathLike):
        return LocalStore(uri, create)
    if not isinstance(uri, str) or not uri:
        raise StoreError(f"invalid store URI {uri!r}")
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        return S3Store(bucket, prefix)
    if uri.startswith("file:"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise StoreError(f"invalid store URI {uri!r}: use file:///absolute/path")
        return LocalStore(unquote(parsed.path), create)
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", uri):
        raise StoreError(f"unsupported store URI {uri!r}: use s3://bucket/prefix, file:///path or a path")
    return LocalStore(uri, create)
