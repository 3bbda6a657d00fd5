"""Prepared folders on an object store: `rpt data prepare` into ``out_dir=s3://bucket/prefix`` (or another
pyarrow filesystem, :mod:`data.location`).

The preparation runs exactly as for a local ``out_dir``: everything is written into a local temporary folder
(``tempfile.mkdtemp``, i.e. under ``TMPDIR``), which is then uploaded, and removed. An object store has no
atomic rename of a folder, so the all-or-nothing guarantee rests on the manifest instead: **a folder without
``manifest.json`` is not prepared data** (training, ``rpt data prepare --if-missing`` and the continual driver
all ask for the manifest), and the manifest is uploaded last, after every shard and the tokenizer. An upload
cut off half-way (a crash, a lost connection) therefore leaves files that nothing takes for a prepared folder,
and ``--if-missing`` prepares it again.

``overwrite`` (``rpt data prepare --overwrite``) replaces a prepared folder, and only one: a prefix that holds
objects but no ``manifest.json`` was not written by `rpt data prepare` and is refused, deleting nothing, as
locally. When replacing, the old ``manifest.json`` is deleted first (from then on the prefix is not prepared
data, so old and new shards are never mixed under a manifest), the new files are uploaded, the new manifest
last, and then the old files that the new folder does not have (e.g. shards of a larger earlier corpus) are
deleted. Without ``overwrite`` a prefix that holds anything is refused.

Multi-node clusters: the shards are written by Ray tasks (:mod:`data.shards`) and the tokenizer is read by the
tokenize actors from the temporary folder, so on a cluster of several nodes ``TMPDIR`` on the driver must be a
folder every node sees (as a local ``out_dir`` must be today); the upload itself runs on the driver.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow.fs as pafs

from data.location import Location

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"


def check_out_dir(target: Location, overwrite: bool) -> None:
    """Refuse a target prefix that holds files, unless ``overwrite`` and it is a prepared folder (has a manifest)."""
    if target.is_file():
        raise FileExistsError(f"out_dir {target.shown!r} exists and is not a folder")
    # anything in it (a local folder may hold only empty folders; an object-store prefix exists only with objects)
    files = target.filesystem.get_file_info(pafs.FileSelector(target.path)) if target.is_dir() else []
    if files and not overwrite:
        raise FileExistsError(
            f"out_dir {target.shown!r} already exists and is not empty; choose another out_dir or set "
            "overwrite=True (`rpt data prepare --overwrite`) to replace it"
        )
    if files and not target.join(MANIFEST_NAME).is_file():
        raise FileExistsError(
            f"out_dir {target.shown!r} holds files but no manifest.json: it was not written by `rpt data prepare`, "
            "so --overwrite does not replace it (nothing was deleted); choose another data.path"
        )


def local_files(folder: Path) -> list[str]:
    """The files below ``folder``, relative, POSIX separators, sorted; ``manifest.json`` (top level) last."""
    rel = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())
    return [r for r in rel if r != MANIFEST_NAME] + ([MANIFEST_NAME] if MANIFEST_NAME in rel else [])


def upload_prepared(folder: Path, target: Location, *, overwrite: bool) -> None:
    """Upload the finished local ``folder`` to ``target``, ``manifest.json`` last (see the module docstring)."""
    names = local_files(folder)
    if not names or names[-1] != MANIFEST_NAME:
        raise ValueError(f"{str(folder)!r} holds no {MANIFEST_NAME}: not a finished prepared folder")
    check_out_dir(target, overwrite)  # again: the prefix may have changed while the data was prepared
    old = {target.relative(i) for i in target.files()}
    if MANIFEST_NAME in old:  # overwrite: the prefix stops being prepared data before any file changes
        target.filesystem.delete_file(target.join(MANIFEST_NAME).path)
    local = pafs.LocalFileSystem()
    for name in names:
        dest = target.join(name)
        if not target.remote:
            Path(dest.path).parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(str(folder / name), dest.path, source_filesystem=local, destination_filesystem=target.filesystem)
    stale = sorted(old - set(names))
    for name in stale:
        target.filesystem.delete_file(target.join(name).path)
    if stale:
        log.info("out_dir %s: deleted %d file(s) of the replaced preparation", target.shown, len(stale))
