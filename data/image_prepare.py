"""`rpt data prepare` for images: fractals, scikit-learn digits or a folder -> Parquet shards + manifest.

The output has the layout of a text dataset (`data/manifest.py`), so the trainer streams it with the
same resumable row-id plan (`data/stream.py`):

```
OUT_DIR/
  manifest.json            ImageManifest, format "rpt-images-v1"
  train/part-00000.parquet images fixed_size_list<uint8>[C*H*W] ((C, H, W) order), labels int64, row_id int64
  val/part-00000.parquet   (+ multi_labels fixed_size_list<uint8>[n_classes] when instances > 1)
```

Sources:

- ``fractals`` (`data/fractals.py`): rendered in parallel with Ray Data, one task per shard:
  ``ray.data.range(n_shards).map_batches(RenderShard, batch_size=1)`` renders the shard's rows with
  :class:`data.fractals.FractalRows` and writes its Parquet file itself, so no image passes through the
  driver. Train row r shows class ``r % n_classes``; val row j is rendered as the global id
  ``train_rows + j`` (so its image differs from every train image, drawn from the same class systems)
  and stored with row id j. Every row comes from a generator seeded with (seed, id), so the shards
  are identical whatever the number of actors or the scheduling. Rows are already class-balanced and
  independent, so they are not shuffled.
- ``digits`` / ``folder`` (`data/images.py`): loaded on the driver (small sets), split with the
  stratified ``ImageSet.split(val_fraction, seed=seed)``, each split shuffled with a seeded permutation
  (otherwise a folder's shards would hold one class each), written by the driver.

Everything is written to a temporary sibling folder and renamed to ``out_dir`` at the end (the helpers
of `data/prepare.py`), so a failure leaves no half-written dataset and loses nothing already there.
On a multi-node cluster ``out_dir`` must be on storage every node sees (the fractal actors write there).
An ``out_dir`` on an object store (``s3://bucket/prefix``) is built in a local temporary folder and uploaded
with ``manifest.json`` last (:mod:`data.upload`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray.data import DataContext

from data import pack
from data.location import is_uri
from data.manifest import ImageManifest, ImageShardInfo, ImageSplitInfo
from data.prepare import _check_out_dir, _data_context, _fmt, _publish, _remote_target, _temp_folder

SPLIT_STREAMS = {"train": 0, "val": 1}  # seeded-shuffle streams of digits/folder rows
_FRACTAL_ONLY = ("n_classes", "instances", "train_rows", "val_rows", "points")
_RENDER_CHUNK = 256  # rows rendered at once inside a shard (bounds the chaos game's working memory)


class ImagePrepareConfig(BaseModel):
    """Settings of one image `rpt data prepare` run (``data.prepare`` with ``kind: images``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["images"] = Field("images", description="selects this config in data.prepare")
    source: Literal["fractals", "digits", "folder"] = Field(
        "fractals", description="procedural IFS fractals, scikit-learn digits, or a folder of class folders"
    )
    folder: str | None = Field(None, description="source=folder: ROOT/<class name>/*.png|jpg|jpeg")
    n_classes: int = Field(10, ge=1, le=1 << 20, description="fractals: classes (one IFS each)")
    instances: int = Field(1, ge=1, le=16, description="fractals: systems per image (> 1 adds multi_labels)")
    image_size: int = Field(32, ge=4, le=1024, description="stored images are image_size x image_size")
    channels: Literal[1, 3] = Field(3, description="1 (grey) or 3 (RGB)")
    train_rows: int = Field(4096, ge=1, description="fractals: training images")
    val_rows: int = Field(512, ge=0, description="fractals: validation images")
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="digits/folder: share of each class for val")
    points: int | None = Field(
        None, ge=1, description="fractals: chaos-game points per image (None: 2 per pixel)"
    )
    shard_rows: int = Field(1024, ge=1, description="rows per Parquet shard (the last may be smaller)")
    seed: int = Field(
        0, ge=0, le=(1 << 64) - 1, description="fractal systems and renders; digits/folder split"
    )
    out_dir: Path | str = Field(
        description="output folder, or an object-store URI such as s3://bucket/prefix (must not exist or be empty "
        "unless overwrite)"
    )
    overwrite: bool = Field(False, description="replace an existing non-empty out_dir")

    @field_validator("out_dir")
    @classmethod
    def _out_dir(cls, v: Path | str) -> Path | str:
        return v if isinstance(v, str) and is_uri(v) else Path(v)  # URIs stay strings (a Path folds s3:// to s3:/)

    @field_validator("folder", mode="before")
    @classmethod
    def _path_str(cls, v: Any) -> Any:
        return os.fspath(v) if isinstance(v, os.PathLike) else v

    @model_validator(mode="after")
    def _source_fields(self) -> ImagePrepareConfig:
        given = self.model_fields_set
        if self.source == "folder" and not self.folder:
            raise ValueError("data.prepare.folder is required with source=folder (ROOT/<class name>/*.png)")
        if self.source != "folder" and self.folder is not None:
            raise ValueError(f"data.prepare.folder is only used with source=folder, not source={self.source}")
        if self.source == "fractals":
            if "val_fraction" in given:
                raise ValueError("data.prepare.val_fraction is for digits/folder; fractals use val_rows")
            return self
        # n_classes may be given as a check: it must match the data (digits here, a folder when read)
        ignored = [k for k in _FRACTAL_ONLY if k in given and k != "n_classes"]
        if ignored:
            raise ValueError(
                f"data.prepare.{', '.join(ignored)} only apply to source=fractals; with source={self.source} "
                "the classes and images come from the data (split by val_fraction)"
            )
        if self.source == "digits" and "n_classes" in given and self.n_classes != 10:
            raise ValueError(
                f"data.prepare.n_classes={self.n_classes}, but digits have 10 classes; leave it out"
            )
        return self

    def resolved_points(self) -> int:
        """Chaos-game points per image (fractals)."""
        from data.fractals import default_points

        return self.points if self.points is not None else default_points(self.image_size)


# ---- writing ------------------------------------------------------------------------------------


def image_table(
    images: np.ndarray, labels: np.ndarray, row_id_start: int, multi_labels: np.ndarray | None = None
) -> pa.Table:
    """uint8 images (N, C, H, W) and labels (N,) -> the shard table (row ids from ``row_id_start``)."""
    n = len(images)
    flat = np.ascontiguousarray(images, dtype=np.uint8).reshape(n, -1)  # (N, C*H*W) in (C, H, W) order
    columns = {
        "images": pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1]),
        "labels": pa.array(np.asarray(labels, dtype=np.int64)),
        "row_id": pa.array(np.arange(row_id_start, row_id_start + n, dtype=np.int64)),
    }
    if multi_labels is not None:
        multi = np.ascontiguousarray(multi_labels, dtype=np.uint8)
        columns["multi_labels"] = pa.FixedSizeListArray.from_arrays(
            pa.array(multi.reshape(-1)), multi.shape[1]
        )
    return pa.table(columns)


def _shard_rel(split: str, index: int) -> str:
    return f"{split}/part-{index:05d}.parquet"


class RenderShard:
    """``map_batches`` callable: shard indices -> that shard rendered and written; returns its location.

    Shard indices ``[0, train_shards)`` are the train shards, the rest the val shards. Passed as an
    instance (like :class:`FractalRows`), so Ray Data runs it in tasks fused with the ``range`` read:
    the class systems are sampled once on the driver and travel pickled. An actor pool (passing the
    class) measured slower here: actor start-up per run, and a later run waited for the previous
    run's actors to release their CPUs.
    """

    def __init__(
        self,
        *,
        out_dir: str,
        n_classes: int,
        seed: int,
        size: int,
        points: int,
        instances: int,
        channels: int,
        shard_rows: int,
        train_rows: int,
        val_rows: int,
    ):
        from data.fractals import FractalRows

        self.render = FractalRows(
            n_classes=n_classes,
            seed=seed,
            size=size,
            points=points,
            instances=instances,
            channels=channels,
            id_column="render_id",
        )
        self.out_dir, self.shard_rows = Path(out_dir), shard_rows
        self.rows = {"train": train_rows, "val": val_rows}
        self.train_shards = -(-train_rows // shard_rows)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {"split": [], "path": [], "rows": [], "row_id_start": []}
        for shard in np.asarray(batch["id"], dtype=np.int64).tolist():
            split, index = (
                ("train", shard) if shard < self.train_shards else ("val", shard - self.train_shards)
            )
            start = index * self.shard_rows
            stop = min(start + self.shard_rows, self.rows[split])
            offset = 0 if split == "train" else self.rows["train"]  # val images: global ids after train
            parts = [
                self.render(
                    {"render_id": np.arange(lo, min(lo + _RENDER_CHUNK, stop), dtype=np.int64) + offset}
                )
                for lo in range(start, stop, _RENDER_CHUNK)
            ]
            table = image_table(
                np.concatenate([p["images"] for p in parts]),
                np.concatenate([p["labels"] for p in parts]),
                start,
                np.concatenate([p["multi_labels"] for p in parts]) if "multi_labels" in parts[0] else None,
            )
            rel = _shard_rel(split, index)
            (self.out_dir / split).mkdir(parents=True, exist_ok=True)
            pq.write_table(table, self.out_dir / rel)
            for key, value in (
                ("split", split),
                ("path", rel),
                ("rows", stop - start),
                ("row_id_start", start),
            ):
                out[key].append(value)
        return {
            "split": np.array(out["split"]),
            "path": np.array(out["path"]),
            "rows": np.array(out["rows"], dtype=np.int64),
            "row_id_start": np.array(out["row_id_start"], dtype=np.int64),
        }


@contextlib.contextmanager
def _without_op_reservation() -> Iterator[None]:
    """Ray Data's per-operator resource reservation off, restored after.

    The pipeline is one fused read+render operator, so there is nothing to reserve resources between;
    with the reservation on, Ray Data kept about one of two CPUs busy: 4096 rows at 32 px took 1.4 s
    instead of 0.8 s, 16384 rows 4.5 s instead of 2.8 s (2-core host, warm workers).
    """
    ctx = DataContext.get_current()
    saved = ctx.op_resource_reservation_enabled
    ctx.op_resource_reservation_enabled = False
    try:
        yield
    finally:
        ctx.op_resource_reservation_enabled = saved


def _render_fractals(config: ImagePrepareConfig, tmp: Path, *, progress: bool) -> dict[str, ImageSplitInfo]:
    """Render and write every fractal shard with Ray Data (one shard per task)."""
    bounds = {
        s: pack.shard_bounds(n, config.shard_rows)
        for s, n in (("train", config.train_rows), ("val", config.val_rows))
    }
    n_shards = len(bounds["train"]) + len(bounds["val"])
    render = RenderShard(
        out_dir=str(tmp),
        n_classes=config.n_classes,
        seed=config.seed,
        size=config.image_size,
        points=config.resolved_points(),
        instances=config.instances,
        channels=config.channels,
        shard_rows=config.shard_rows,
        train_rows=config.train_rows,
        val_rows=config.val_rows,
    )
    with _data_context(progress), _without_op_reservation():
        # one block per shard, so each task (one CPU) renders and writes one shard
        written = (
            ray.data.range(n_shards, override_num_blocks=n_shards)
            .map_batches(render, batch_size=1, batch_format="numpy")
            .take_all()
        )
    splits = {}
    for split, split_bounds in bounds.items():
        got = sorted((r for r in written if r["split"] == split), key=lambda r: int(r["row_id_start"]))
        shards = [
            ImageShardInfo(path=str(r["path"]), rows=int(r["rows"]), row_id_start=int(r["row_id_start"]))
            for r in got
        ]
        expected = [(_shard_rel(split, i), lo, hi - lo) for i, (lo, hi) in enumerate(split_bounds)]
        assert [(s.path, s.row_id_start, s.rows) for s in shards] == expected, (split, shards, expected)
        splits[split] = ImageSplitInfo(rows=sum(s.rows for s in shards), shards=shards)
    return splits


def _write_split(
    images: np.ndarray, labels: np.ndarray, *, out_dir: Path, split: str, shard_rows: int
) -> ImageSplitInfo:
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    shards = []
    for i, (start, stop) in enumerate(pack.shard_bounds(len(images), shard_rows)):
        rel = _shard_rel(split, i)
        pq.write_table(image_table(images[start:stop], labels[start:stop], start), out_dir / rel)
        shards.append(ImageShardInfo(path=rel, rows=stop - start, row_id_start=start))
    return ImageSplitInfo(rows=len(images), shards=shards)


def _load_image_set(config: ImagePrepareConfig):
    from data.images import load_digits, read_image_folder

    if config.source == "digits":
        return load_digits(size=config.image_size, channels=config.channels), {"kind": "digits"}
    folder = Path(config.folder).expanduser().absolute()
    images = read_image_folder(folder, size=config.image_size, channels=config.channels)
    if "n_classes" in config.model_fields_set and config.n_classes != len(images.class_names):
        raise ValueError(
            f"data.prepare.n_classes={config.n_classes}, but {str(folder)!r} has {len(images.class_names)} "
            f"class folders ({', '.join(images.class_names)}); leave n_classes out"
        )
    return images, {"kind": "folder", "path": str(folder)}


def _write_image_set(config: ImagePrepareConfig, tmp: Path):
    """Digits/folder: load on the driver, stratified split, seeded shuffle per split, write shards."""
    images, source = _load_image_set(config)
    train, val = images.split(config.val_fraction, seed=config.seed)
    if len(train) == 0:
        raise ValueError(f"{source}: no training images left after val_fraction={config.val_fraction}")
    splits = {}
    for name, part in (("train", train), ("val", val)):
        perm = np.random.default_rng([config.seed, SPLIT_STREAMS[name]]).permutation(len(part))
        splits[name] = _write_split(
            part.images[perm], part.labels[perm], out_dir=tmp, split=name, shard_rows=config.shard_rows
        )
    source["val_fraction"] = config.val_fraction
    return splits, source, list(images.class_names)


def _print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"rpt data prepare (images) -> {summary['out_dir']}", show_header=False)
    for key in (
        "source",
        "n_classes",
        "image_size",
        "channels",
        "train_rows",
        "val_rows",
        "shards",
        "seconds",
        "images_per_s",
    ):
        table.add_row(key, _fmt(summary[key]))
    Console().print(table)


# ---- entry point --------------------------------------------------------------------------------


def prepare_images(config: ImagePrepareConfig, *, progress: bool = True) -> dict[str, Any]:
    """Write ``config``'s images to ``config.out_dir`` as Parquet shards + manifest.json; returns a summary.

    Fractals use the current Ray instance (Ray Data starts a local one if none is running); digits and
    folders need no Ray. ``progress`` turns Ray Data's progress bars and the summary table on or off.
    Summary keys: out_dir, source, n_classes, image_size, channels, train_rows, val_rows, train_shards,
    val_shards, shards, seconds, images_per_s.
    """
    t0 = time.perf_counter()
    target = _remote_target(config.out_dir, config.overwrite)  # an object store: built locally, then uploaded
    out_dir = Path(config.out_dir).expanduser().absolute() if target is None else None
    if out_dir is not None:
        _check_out_dir(out_dir, config.overwrite)
    tmp = _temp_folder(out_dir)
    try:
        if config.source == "fractals":
            splits = _render_fractals(config, tmp, progress=progress)
            source = {
                "kind": "fractals",
                "instances": config.instances,
                "points": config.resolved_points(),
                "colored": True,
                "background": "random",
            }
            class_names = [str(c) for c in range(config.n_classes)]
        else:
            splits, source, class_names = _write_image_set(config, tmp)
        manifest = ImageManifest(
            image_size=config.image_size,
            channels=config.channels,
            n_classes=len(class_names),
            class_names=class_names,
            seed=config.seed,
            source=source,
            splits=splits,
            instances=config.instances if config.source == "fractals" else 1,
        )
        manifest.save(tmp)
        manifest.verify(tmp)
        _publish(tmp, out_dir, target, config.overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    seconds = time.perf_counter() - t0
    rows = splits["train"].rows + splits["val"].rows
    summary: dict[str, Any] = {
        "out_dir": str(out_dir) if target is None else target.shown,
        "source": config.source,
        "n_classes": manifest.n_classes,
        "image_size": config.image_size,
        "channels": config.channels,
        "train_rows": splits["train"].rows,
        "val_rows": splits["val"].rows,
        "train_shards": len(splits["train"].shards),
        "val_shards": len(splits["val"].shards),
        "shards": len(splits["train"].shards) + len(splits["val"].shards),
        "seconds": seconds,
        "images_per_s": rows / seconds if seconds > 0 else 0.0,
    }
    if progress:
        _print_summary(summary)
    return summary
