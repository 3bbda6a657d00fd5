"""Where runs keep their checkpoints: a local/NFS folder or an object store (S3 or S3-compatible).

``storage_path`` in a run config is either a path (``results``, ``/mnt/shared/results``) or a URI
(``s3://bucket/prefix``). Ray Train writes run folders and checkpoints through a pyarrow filesystem;
the driver reads them back through the same filesystem (resume, registry), so both kinds behave alike.

S3-compatible endpoints (MinIO, Ceph, moto, ...) are given as for data paths (:mod:`data.location`, which
builds the filesystem for both), first match wins:

1. query parameters of the URI, as pyarrow names them:
   ``s3://bucket/prefix?endpoint_override=http://minio:9000&region=us-east-1``;
2. ``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL`` in the environment (the AWS SDKs' names).

Credentials are never part of the config or the URI: the AWS SDK inside pyarrow reads them on every
process from its default chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
``~/.aws/credentials``, an instance or pod role). The filesystem object that Ray pickles to the workers
carries no credentials, only the endpoint and options, so every node needs the credentials in its own
environment (``rpt submit`` passes ``AWS_*`` through the job's runtime environment; on Kubernetes they
come from a Secret, see docs/kubernetes.md).
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pyarrow.fs as pafs

from data.location import LocationError, is_uri, s3_filesystem
from trainers.checkpoint import (
    TRAIN_STATE,
    TrainState,
    checkpoint_folders,
    checkpoint_problem,
    newest_complete,
)

log = logging.getLogger(__name__)

class StorageError(ValueError):
    """storage_path cannot be used as given (names the value and the fix)."""


@dataclass(frozen=True)
class Storage:
    """A resolved ``storage_path``: what Ray Train gets, and file access for the driver.

    ``root`` is a path inside ``filesystem``: an absolute local path, or ``bucket/prefix`` for S3.
    Paths handed around (checkpoint paths from Ray's ``Result``) are in the same form.
    """

    uri: str  # as configured, without options: s3://bucket/prefix or /abs/path
    root: str
    filesystem: pafs.FileSystem
    remote: bool

    # --- what Ray Train gets -----------------------------------------------------------------
    def ray_run_config_kwargs(self) -> dict[str, Any]:
        """``storage_path`` (+ ``storage_filesystem`` for remote storage) for ``ray.train.RunConfig``."""
        if self.remote:
            return {"storage_path": self.root, "storage_filesystem": self.filesystem}
        return {"storage_path": self.root}

    # --- paths -------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """A path below the root, in the filesystem's form."""
        return posixpath.join(self.root, *parts) if self.remote else str(Path(self.root, *parts))

    def uri_of(self, path: str) -> str:
        """A user-facing location for a filesystem path (``s3://...`` for S3, the path itself locally)."""
        if not self.remote:
            return path
        scheme = urlsplit(self.uri).scheme
        return f"{scheme}://{path}"

    # --- file access -------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        return self.filesystem.get_file_info(path).type != pafs.FileType.NotFound

    def is_dir(self, path: str) -> bool:
        return self.filesystem.get_file_info(path).type == pafs.FileType.Directory

    def read_text(self, path: str) -> str:
        with self.filesystem.open_input_stream(path) as f:
            return f.read().decode()

    def write_text(self, path: str, text: str) -> None:
        self.filesystem.create_dir(posixpath.dirname(path) if self.remote else str(Path(path).parent), recursive=True)
        with self.filesystem.open_output_stream(path) as f:
            f.write(text.encode())

    def makedirs(self, path: str) -> None:
        self.filesystem.create_dir(path, recursive=True)

    # --- runs and checkpoints ----------------------------------------------------------------
    def unique_run_name(self, name: str) -> str:
        """``name``, or ``name-2``, ``name-3``, ... if a run of that name already exists here."""
        if not self.exists(self.path(name)):
            return name
        i = 2
        while self.exists(self.path(f"{name}-{i}")):
            i += 1
        return f"{name}-{i}"

    def checkpoints(self, run_name: str) -> list[tuple[TrainState, str]]:
        """The complete checkpoints of a run (every rank's completion marker present, every file of the size
        its writer recorded: :func:`trainers.checkpoint.checkpoint_problem`), oldest step first."""
        found = [(self.read_train_state(p), p) for p in checkpoint_folders(self.filesystem, self.path(run_name))
                 if checkpoint_problem(self.filesystem, p, deep=False) is None]
        return sorted(found, key=lambda sp: sp[0].step)

    def newest_checkpoint(self, run_name: str) -> tuple[tuple[TrainState, str] | None, list[tuple[str, str]]]:
        """The run's newest complete checkpoint and the newer ones skipped (path, why), each logged: hashes are
        checked on local storage, sizes on object stores (whose uploads are checksummed by the store)."""
        found, skipped = newest_complete(self.filesystem, self.path(run_name), deep=not self.remote)
        for path, why in skipped:
            log.warning("checkpoint %s skipped: %s", self.uri_of(path), why)
        return found, skipped

    def latest_checkpoint(self, run_name: str) -> tuple[TrainState, str] | None:
        """The newest complete checkpoint of a run, with its train state (None: no complete checkpoint)."""
        return self.newest_checkpoint(run_name)[0]

    def incomplete_checkpoints(self, run_name: str) -> list[tuple[str, str]]:
        """Checkpoint folders of the run that are not complete (cut off, or orphaned by workers that lost their
        run, e.g. after a node loss), with why: listed at the end of a fit, never deleted."""
        problems = ((p, checkpoint_problem(self.filesystem, p, deep=False))
                    for p in checkpoint_folders(self.filesystem, self.path(run_name)))
        return [(p, why) for p, why in problems if why]

    def state_of(self, checkpoint: str) -> TrainState:
        """The train state of a checkpoint given as a local folder or as a URI of this store (``s3://...``: a
        checkpoint another run of this storage wrote, e.g. the previous continual task's)."""
        if not is_uri(checkpoint):
            return TrainState.load(checkpoint)
        bucket = self.root.split("/")[0]
        if not self.remote or checkpoint.split("://", 1)[1].split("/")[0] != bucket:
            raise StorageError(f"{checkpoint!r} is not in this run's storage ({self.uri}): give a checkpoint of the "
                               "same store, or a local folder")
        return self.read_train_state(checkpoint.split("://", 1)[1])

    def read_train_state(self, checkpoint_path: str) -> TrainState:
        path = _join(checkpoint_path, TRAIN_STATE, remote=self.remote)
        if not self.exists(path):
            raise FileNotFoundError(f"{self.uri_of(path)} is missing: not a ray-pretrain checkpoint")
        return TrainState.from_json(self.read_text(path))

    def download(
        self, path: str, dest: str | Path, *, files: Sequence[str] | None = None, optional: Sequence[str] = ()
    ) -> Path:
        """Copy a folder (all of it, or only ``files`` and, where present, ``optional`` from its top level) to
        the local folder ``dest``."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        if files is None:
            pafs.copy_files(path, str(dest), source_filesystem=self.filesystem,
                            destination_filesystem=pafs.LocalFileSystem())
            return dest
        for name in [*files, *optional]:
            src = _join(path, name, remote=self.remote)
            if not self.exists(src):
                if name in optional:
                    continue
                raise FileNotFoundError(f"{self.uri_of(src)} is missing")
            pafs.copy_files(src, str(dest / name), source_filesystem=self.filesystem,
                            destination_filesystem=pafs.LocalFileSystem())
        return dest

    @contextlib.contextmanager
    def local_checkpoint(
        self, path: str, *, files: Sequence[str] | None, optional: Sequence[str] = ()
    ) -> Iterator[Path]:
        """A local folder with the checkpoint's ``files`` (None: all of it): the folder itself when local, else
        a download into a temporary folder removed on exit. The registry asks for the workload's export files:
        the DeepSpeed optimizer state (~12 bytes per parameter) stays in the store."""
        if not self.remote:
            yield Path(path)
            return
        with tempfile.TemporaryDirectory(prefix="rpt-ckpt-") as tmp:
            yield self.download(path, tmp, files=files, optional=optional)


def _join(path: str, name: str, *, remote: bool) -> str:
    return posixpath.join(path, name) if remote else str(Path(path, name))


def resolve_storage(storage_path: str, *, create: bool = True) -> Storage:
    """Resolve a config's ``storage_path`` (local path, ``file://``, ``s3://bucket/prefix?options``).

    Local paths become absolute (Ray workers run in other working directories) and are created;
    for S3 the bucket must exist (it is checked here, so a typo fails on the driver, not in a worker).
    Other URI schemes (``gs://``, ``hdfs://``, ``abfs://``) go through ``pyarrow.fs.FileSystem.from_uri``.
    """
    if storage_path.startswith("file://"):
        storage_path = urlsplit(storage_path).path
    if not is_uri(storage_path):
        root = Path(storage_path).expanduser().resolve()
        if create:
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StorageError(f"storage_path={storage_path!r} cannot be created ({e.strerror or e}: {e.filename or root}); "
                                   "point storage_path at a folder you can write") from None
        return Storage(uri=str(root), root=str(root), filesystem=pafs.LocalFileSystem(), remote=False)

    parts = urlsplit(storage_path)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    bare = f"{parts.scheme}://{parts.netloc}{parts.path}".rstrip("/")
    if parts.scheme in ("s3", "s3a"):
        if not parts.netloc:
            raise StorageError(f"storage_path={storage_path!r}: no bucket; expected s3://BUCKET/PREFIX")
        try:
            fs = s3_filesystem(query, what="storage_path")
        except LocationError as e:
            raise StorageError(str(e)) from None
        root = f"{parts.netloc}{parts.path}".rstrip("/")
        bare = f"s3://{root}"
    else:
        try:
            fs, root = pafs.FileSystem.from_uri(storage_path)
        except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise StorageError(f"storage_path={storage_path!r}: {e}") from None
    storage = Storage(uri=bare, root=root, filesystem=fs, remote=True)
    if create:
        bucket = root.split("/", 1)[0]
        try:
            info = fs.get_file_info(bucket)
        except OSError as e:
            raise StorageError(
                f"storage_path={bare!r}: cannot reach the store ({e}). Check the endpoint (endpoint_override or "
                "AWS_ENDPOINT_URL) and the credentials in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
            ) from None
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"storage_path={bare!r}: bucket {bucket!r} does not exist; create it first")
    return storage
