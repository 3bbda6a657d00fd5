"""Where data lives: a local (or NFS) path, or a URI of an object store or other pyarrow filesystem.

``data.path``, ``data.eval_sets``, ``data.replay.paths``, ``data.prepare.corpus`` and ``storage_path`` may each
be a path (``data/pydoc``, ``/mnt/shared/data``) or a URI: ``s3://bucket/prefix`` (S3 or S3-compatible), or any
scheme ``pyarrow.fs.FileSystem.from_uri`` knows (``gs://``, ``hdfs://``, ``abfs://``). :func:`resolve` turns one
into a :class:`Location`: a pyarrow filesystem, the path inside it and the URI to hand on.

S3-compatible endpoints (MinIO, Ceph, moto, ...) are given by, first match wins:

1. query parameters of the URI, as pyarrow names them:
   ``s3://bucket/prefix?endpoint_override=http://minio:9000&region=us-east-1``;
2. ``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL`` in the environment (the AWS SDKs' names).

The region comes from the ``region`` query parameter, else ``AWS_REGION``, else ``AWS_DEFAULT_REGION``.
Credentials are never part of a config or a URI: the AWS SDK inside pyarrow reads them on every process from
its default chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, ``~/.aws/credentials``,
an instance or pod role).

What travels to Ray workers is the URI of each file (``s3://bucket/data/train/part-00000.parquet``, with the
folder's query parameters): every worker resolves the filesystem itself (:func:`open_file`, :func:`read_parquet`),
so each node needs the credentials in its own environment, and the endpoint comes from the URI or that
environment. Filesystems are cached per process, keyed by the URI's scheme, options and the endpoint variables.
"""

from __future__ import annotations

import functools
import hashlib
import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import pyarrow.fs as pafs

# S3FileSystem options that may be given as URI query parameters (strings in the URI).
S3_OPTIONS: dict[str, type] = {
    "endpoint_override": str,
    "region": str,
    "scheme": str,
    "force_virtual_addressing": bool,
    "allow_bucket_creation": bool,
    "request_timeout": float,
    "connect_timeout": float,
    "tls_ca_file_path": str,
}
S3_SCHEMES = ("s3", "s3a")
_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")
_CREDENTIALS_FIX = (
    "Check the endpoint (the URI's endpoint_override, or AWS_ENDPOINT_URL) and the credentials in the environment "
    "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
)


class LocationError(ValueError):
    """A path or URI cannot be used as given; the message names the value, the cause and the fix."""


def is_uri(spec: str | Path) -> bool:
    """A URI of a filesystem other than the local one (``file://`` URIs are local paths)."""
    s = str(spec)
    return "://" in s and not s.startswith("file://")


def _parse_bool(key: str, value: str, what: str) -> bool:
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise LocationError(f"{what} option {key}={value!r}: expected true or false")


def s3_options(query: dict[str, str] | None = None, *, what: str = "the URI") -> dict[str, Any]:
    """``S3FileSystem`` keyword arguments from URI query parameters and the environment (never credentials)."""
    opts: dict[str, Any] = {}
    for key, value in (query or {}).items():
        kind = S3_OPTIONS.get(key)
        if kind is None:
            raise LocationError(
                f"{what}: option {key!r} is not supported; allowed: {sorted(S3_OPTIONS)}. Credentials never go "
                "into a URI: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in the environment"
            )
        opts[key] = _parse_bool(key, value, what) if kind is bool else kind(value)
    endpoint = opts.get("endpoint_override") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_override"] = endpoint
    region = opts.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        opts["region"] = region
    return opts


def s3_filesystem(query: dict[str, str] | None = None, *, what: str = "the URI") -> pafs.S3FileSystem:
    """An S3FileSystem with the endpoint and options from ``query`` or the environment; no credentials.

    pyarrow's constructor ignores ``AWS_ENDPOINT_URL`` (only ``FileSystem.from_uri`` reads it), so the
    endpoint is resolved here and stored in the filesystem: workers then need only the credentials.
    """
    return pafs.S3FileSystem(**s3_options(query, what=what))


@functools.lru_cache(maxsize=32)
def _cached_filesystem(scheme: str, netloc: str, query: str, env: tuple[str | None, ...]) -> pafs.FileSystem:
    del env  # part of the cache key only: another endpoint or region in the environment is another filesystem
    if scheme in S3_SCHEMES:
        return s3_filesystem(dict(parse_qsl(query, keep_blank_values=True)))
    fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{netloc}/" + (f"?{query}" if query else ""))
    return fs


@dataclass(frozen=True)
class Location:
    """A resolved data location.

    ``path`` is the path inside ``filesystem`` (an absolute local path, ``bucket/prefix`` for S3); ``uri`` is what
    is handed on (an absolute local path, or ``s3://bucket/prefix?options``); ``shown`` is what messages name
    (the path as given, or the URI without its options).
    """

    filesystem: pafs.FileSystem
    path: str
    remote: bool
    shown: str
    base: str = ""  # remote: scheme://netloc/path, without the query
    query: str = ""  # remote: the URI's query string, kept on the URIs of files below it

    def __str__(self) -> str:
        return self.shown

    @property
    def uri(self) -> str:
        if not self.remote:
            return self.path
        return self.base + (f"?{self.query}" if self.query else "")

    def join(self, *parts: str) -> Location:
        """A location below this one (``parts`` are relative, POSIX separators)."""
        if not self.remote:
            return replace(self, path=str(Path(self.path, *parts)), shown=str(Path(self.shown, *parts)))
        return replace(self, path=posixpath.join(self.path, *parts), shown=posixpath.join(self.shown, *parts),
                       base=posixpath.join(self.base, *parts))

    @property
    def parent(self) -> Location:
        """The folder this location is in."""
        if not self.remote:
            return replace(self, path=str(Path(self.path).parent), shown=str(Path(self.shown).parent))
        return replace(self, path=posixpath.dirname(self.path), shown=posixpath.dirname(self.shown),
                       base=posixpath.dirname(self.base))

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    # --- file access -------------------------------------------------------------------------------------------
    def info(self) -> pafs.FileInfo:
        return self.filesystem.get_file_info(self.path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        """A folder; on an object store, a prefix with at least one object below it."""
        return self.info().type == pafs.FileType.Directory

    def files(self) -> list[pafs.FileInfo]:
        """Every file below this folder (recursively), sorted by path; ``[]`` when there is none."""
        if not self.is_dir():
            return []
        infos = self.filesystem.get_file_info(pafs.FileSelector(self.path, recursive=True))
        return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)

    def read_bytes(self) -> bytes:
        with self.filesystem.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def sha256(self) -> str:
        """Hex SHA-256 of the file's bytes, read in 1 MiB chunks."""
        digest = hashlib.sha256()
        with self.filesystem.open_input_stream(self.path) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()

    def write_bytes(self, data: bytes) -> None:
        if not self.remote:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with self.filesystem.open_output_stream(self.path) as f:
            f.write(data)

    def relative(self, info: pafs.FileInfo) -> str:
        """The path of a file below this folder, relative to it (POSIX separators)."""
        return posixpath.relpath(info.path, self.path)


def resolve(spec: str | Path, *, what: str = "path") -> Location:
    """A path or URI as a :class:`Location`; ``what`` names the config field in errors (``data.path``).

    Local paths become absolute (Ray workers run in other working directories); nothing is checked or created.
    """
    s = str(spec)
    if s.startswith("file://"):
        s = urlsplit(s).path
    if not is_uri(s):
        local = Path(s).expanduser()
        return Location(pafs.LocalFileSystem(), str(local.absolute()), remote=False, shown=str(Path(s)))
    parts = urlsplit(s)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    base = f"{parts.scheme}://{parts.netloc}{parts.path}".rstrip("/")
    env = tuple(os.environ.get(k) for k in _ENV)
    if parts.scheme in S3_SCHEMES:
        if not parts.netloc:
            raise LocationError(f"{what}={s!r}: no bucket; expected s3://BUCKET/PREFIX")
        s3_options(query, what=f"{what}={base!r}")  # unknown options fail here, naming the field
        canonical = urlencode(sorted(query.items()), safe=":/")
        fs = _cached_filesystem(parts.scheme, "", canonical, env)
        path = f"{parts.netloc}{parts.path}".rstrip("/")
        return Location(fs, path, remote=True, shown=base, base=base, query=canonical)
    try:
        _, path = pafs.FileSystem.from_uri(s)
        fs = _cached_filesystem(parts.scheme, parts.netloc, parts.query, env)
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise LocationError(
            f"{what}={s!r}: {e}. Give a local path, s3://BUCKET/PREFIX, or another URI pyarrow knows (gs://, hdfs://, "
            "abfs://)"
        ) from None
    return Location(fs, path.rstrip("/"), remote=True, shown=base, base=base, query=parts.query)


def child_uri(folder: str | Path, relative: str) -> str:
    """The URI (or absolute local path) of ``relative`` below the folder ``folder``."""
    return resolve(folder).join(relative).uri


def check_reachable(loc: Location, what: str) -> None:
    """Fail with one clear paragraph when ``loc``'s store cannot be reached or its bucket does not exist
    (remote locations; local ones need no check)."""
    if not loc.remote:
        return
    bucket = loc.path.split("/", 1)[0]
    try:
        info = loc.filesystem.get_file_info(bucket)
    except OSError as e:
        raise LocationError(f"{what}={loc.shown!r}: cannot reach the store ({_first_line(e)}). {_CREDENTIALS_FIX}") from None
    if info.type == pafs.FileType.NotFound:
        raise LocationError(
            f"{what}={loc.shown!r}: bucket {bucket!r} does not exist at this endpoint; create it, or fix the bucket "
            "name or the endpoint (the URI's endpoint_override, AWS_ENDPOINT_URL)"
        )


def io_error(what: str, loc: Location | str, exc: BaseException) -> LocationError:
    """A :class:`LocationError` for a failed read or write of ``loc`` (one paragraph: field, cause, fix)."""
    return LocationError(f"{what}={str(loc)!r}: cannot be read or written ({_first_line(exc)}). {_CREDENTIALS_FIX}")


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


# --- used inside Ray tasks: the URI is all they get ---------------------------------------------------------------


def open_parquet_source(uri: str) -> tuple[str, pafs.FileSystem | None]:
    """``(path, filesystem)`` for pyarrow's Parquet readers: the filesystem is None for a local path."""
    if not is_uri(uri):
        return uri, None
    loc = resolve(uri)
    return loc.path, loc.filesystem


def read_parquet(uri: str, columns: Sequence[str] | None = None):
    """A Parquet file (local path or URI) as a pyarrow Table."""
    import pyarrow.parquet as pq

    path, fs = open_parquet_source(uri)
    return pq.read_table(path, columns=list(columns) if columns is not None else None, filesystem=fs)


def copy_to_local(uri: str, dest: str | Path) -> None:
    """Copy one file (local path or URI) to the local path ``dest``."""
    loc = resolve(uri)
    pafs.copy_files(loc.path, str(dest), source_filesystem=loc.filesystem,
                    destination_filesystem=pafs.LocalFileSystem())
