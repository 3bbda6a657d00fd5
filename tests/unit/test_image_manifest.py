"""Image datasets without Ray: `ImageManifest` validation, files and verify(), `load_any_manifest`,
`load_shards` on image folders, `ImagePrepareConfig` and its selection by `DataSpec.prepare_config`."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from data.image_prepare import ImagePrepareConfig, image_table
from data.manifest import ImageManifest, ImageShardInfo, ImageSplitInfo, Manifest, load_any_manifest
from data.stream import load_shards
from data.tokenizer import EOS_TOKEN, PAD_TOKEN

SIZE, CHANNELS, N_CLASSES = 4, 3, 3
PIXELS = CHANNELS * SIZE * SIZE


def _split(name: str, rows_per_shard: list[int], starts: list[int] | None = None) -> dict:
    starts = starts if starts is not None else list(np.cumsum([0, *rows_per_shard[:-1]])) if rows_per_shard else []
    shards = [
        {"path": f"{name}/part-{i:05d}.parquet", "rows": r, "row_id_start": int(s)}
        for i, (r, s) in enumerate(zip(rows_per_shard, starts, strict=True))
    ]
    return {"rows": sum(rows_per_shard), "shards": shards}


def _manifest(**over) -> dict:
    d = {
        "format": "rpt-images-v1",
        "image_size": SIZE,
        "channels": CHANNELS,
        "n_classes": N_CLASSES,
        "class_names": ["a", "b", "c"],
        "seed": 7,
        "source": {"kind": "fractals", "instances": 1, "points": 32},
        "splits": {"train": _split("train", [5, 3]), "val": _split("val", [2])},
    }
    d.update(over)
    return d


def _write_shards(root, manifest: ImageManifest) -> None:
    """Shards matching `manifest`: image i of a split is filled with the value i, label i % n_classes."""
    for split, info in manifest.splits.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for shard in info.shards:
            ids = np.arange(shard.row_id_start, shard.row_id_start + shard.rows)
            images = np.broadcast_to(ids[:, None, None, None], (shard.rows, manifest.channels, SIZE, SIZE))
            pq.write_table(image_table(images.astype(np.uint8), ids % manifest.n_classes, shard.row_id_start),
                           root / shard.path)


# ---- ImageManifest ------------------------------------------------------------------------------


def test_image_manifest_round_trip(tmp_path):
    m = ImageManifest.model_validate(_manifest())
    assert m.pixels == PIXELS == 48
    assert m.instances == 1
    assert [s.row_id_start for s in m.splits["train"].shards] == [0, 5]
    path = m.save(tmp_path)
    assert path == tmp_path / "manifest.json"
    assert not (tmp_path / ".manifest.json.tmp").exists()  # the temp file was renamed
    assert json.loads(path.read_text())["format"] == "rpt-images-v1"
    loaded = ImageManifest.load(tmp_path)
    assert loaded == m
    assert loaded.shard_paths(tmp_path, "train") == [tmp_path / "train/part-00000.parquet",
                                                     tmp_path / "train/part-00001.parquet"]
    assert loaded.columns() == ["images", "labels", "row_id"]
    multi = ImageManifest.model_validate(_manifest(instances=2))
    assert multi.columns() == ["images", "labels", "row_id", "multi_labels"]
    assert multi.arrow_schema().field("multi_labels").type == pa.list_(pa.uint8(), N_CLASSES)


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"splits": {"train": _split("train", [5, 3], starts=[0, 6]), "val": _split("val", [])}},
         r"starts at row id 6, expected 5 \(row ids must be contiguous"),
        ({"splits": {"train": {"rows": 9, "shards": _split("train", [5, 3])["shards"]}, "val": _split("val", [])}},
         "shards hold 8 rows but the split says rows=9"),
        ({"splits": {"train": _split("train", [5])}}, r"splits \['val'\] are missing"),
        ({"format": "rpt-packed-v1"}, "rpt-images-v1"),
        ({"channels": 2}, "channels=2 is not allowed; allowed: 1 or 3"),
        ({"class_names": ["a", "b"]}, "class_names has 2 entries, n_classes=3"),
        ({"instances": 0}, "instances"),
        ({"tokenizer": {}}, "tokenizer"),
    ],
)
def test_image_manifest_rejects_inconsistent_values(over, match):
    with pytest.raises(ValidationError, match=match):
        ImageManifest.model_validate(_manifest(**over))


def test_image_manifest_is_frozen_and_paths_relative():
    m = ImageManifest.model_validate(_manifest())
    with pytest.raises(ValidationError, match="frozen"):
        m.seed = 1
    with pytest.raises(ValidationError, match="relative"):
        ImageShardInfo(path="../x.parquet", rows=1, row_id_start=0)
    assert ImageSplitInfo(rows=0).shards == []


def test_image_manifest_load_names_path_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist; create it with `rpt data prepare`"):
        ImageManifest.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"manifest\.json.*create one with `rpt data prepare`"):
        ImageManifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps(_manifest(channels=5)))
    with pytest.raises(ValueError, match=r"invalid image manifest .*manifest\.json.*rpt data prepare"):
        ImageManifest.load(tmp_path)


def test_verify_passes_on_matching_shards_and_names_each_fault(tmp_path):
    m = ImageManifest.model_validate(_manifest())
    _write_shards(tmp_path, m)
    m.save(tmp_path)
    m.verify(tmp_path)
    table = pq.read_table(tmp_path / "train/part-00001.parquet")
    assert table["row_id"].to_pylist() == [5, 6, 7]
    assert table["labels"].to_pylist() == [2, 0, 1]
    assert np.stack(table["images"].to_numpy(zero_copy_only=False))[:, 0].tolist() == [5, 6, 7]

    shard = tmp_path / "train/part-00001.parquet"
    # wrong row count
    pq.write_table(image_table(np.zeros((2, CHANNELS, SIZE, SIZE), np.uint8), np.zeros(2), 5), shard)
    with pytest.raises(ValueError, match=r"train shard .*part-00001\.parquet.* holds 2 rows, the manifest says 3.*rpt data prepare"):
        m.verify(tmp_path)
    # wrong image size
    pq.write_table(image_table(np.zeros((3, CHANNELS, 2, 2), np.uint8), np.zeros(3), 5), shard)
    with pytest.raises(ValueError, match=r"part-00001\.parquet.* has columns images: fixed_size_list<uint8>\[12\], labels: int64, row_id: int64, "
                       r"expected images: fixed_size_list<uint8>\[48\], labels: int64, row_id: int64; re-run"):
        m.verify(tmp_path)
    # wrong row ids (contiguity is checked from the footer's statistics)
    pq.write_table(image_table(np.zeros((3, CHANNELS, SIZE, SIZE), np.uint8), np.zeros(3), 4), shard)
    with pytest.raises(ValueError, match=r"part-00001\.parquet.* holds row ids 4\.\.6, the manifest says 5\.\.7"):
        m.verify(tmp_path)
    # not Parquet
    shard.write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"part-00001\.parquet.* is not a readable Parquet file"):
        m.verify(tmp_path)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"train shard .*part-00001\.parquet.* is missing.*rpt data prepare"):
        m.verify(tmp_path)


# ---- load_any_manifest / load_shards -------------------------------------------------------------


def _text_manifest() -> Manifest:
    return Manifest.model_validate({
        "seq_len": 3, "row_len": 4, "seed": 0,
        "source": {"corpus": "x", "documents": 3, "characters": 10},
        "tokenizer": {"sha256": "0" * 64, "vocab_size": 300, "eos_id": 0, "pad_id": 1,
                      "special_tokens": {EOS_TOKEN: 0, PAD_TOKEN: 1}},
        "splits": {"train": {"rows": 2, "tokens": 8, "shards": [
            {"path": "train/part-00000.parquet", "rows": 2, "tokens": 8, "row_id_start": 0}]},
            "val": {"rows": 0, "tokens": 0, "shards": []}},
        "documents": {"train": 2, "val": 1}, "dropped_tokens": 0,
    })  # fmt: skip


def test_load_any_manifest_dispatches_on_format(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "txt").mkdir()
    ImageManifest.model_validate(_manifest()).save(tmp_path / "img")
    _text_manifest().save(tmp_path / "txt")
    img, txt = load_any_manifest(tmp_path / "img"), load_any_manifest(tmp_path / "txt")
    assert type(img) is ImageManifest and img.seed == 7
    assert type(txt) is Manifest and txt.row_len == 4


def test_load_any_manifest_rejects_unknown_format(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "rpt-audio-v9", "splits": {}}))
    with pytest.raises(ValueError, match=r"format 'rpt-audio-v9'; allowed formats: 'rpt-packed-v1', 'rpt-images-v1'"):
        load_any_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_any_manifest(tmp_path)
    with pytest.raises(FileNotFoundError, match="rpt data prepare"):
        load_any_manifest(tmp_path / "missing")


def test_load_shards_reads_image_manifests_and_names_a_missing_one(tmp_path):
    ImageManifest.model_validate(_manifest()).save(tmp_path)
    shards = load_shards(tmp_path, "train")
    assert [(s.path, s.rows, s.row_id_start) for s in shards] == [
        (str(tmp_path.resolve() / "train/part-00000.parquet"), 5, 0),
        (str(tmp_path.resolve() / "train/part-00001.parquet"), 3, 5),
    ]
    assert [(s.rows, s.row_id_start) for s in load_shards(tmp_path, "val")] == [(2, 0)]
    with pytest.raises(FileNotFoundError, match=r"manifest\.json.* is not a prepared dataset folder.*rpt data prepare"):
        load_shards(tmp_path / "empty", "train")


# ---- ImagePrepareConfig / DataSpec.prepare_config --------------------------------------------------


def test_image_prepare_config_defaults_and_paths(tmp_path):
    c = ImagePrepareConfig(out_dir=str(tmp_path / "out"), folder=None)  # like PrepareConfig: out_dir is a Path
    assert (c.kind, c.source, c.n_classes, c.image_size, c.channels) == ("images", "fractals", 10, 32, 3)
    assert (c.train_rows, c.val_rows, c.shard_rows, c.instances) == (4096, 512, 1024, 1)
    assert c.out_dir == tmp_path / "out"
    folder = ImagePrepareConfig(out_dir="x", source="folder", folder=tmp_path)  # folder: a Path is stored as str
    assert folder.folder == str(tmp_path)
    assert c.resolved_points() == 2 * 32 * 32
    assert ImagePrepareConfig(out_dir="x", points=100).resolved_points() == 100


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"source": "folder"}, r"data\.prepare\.folder is required with source=folder"),
        ({"source": "digits", "folder": "x"}, r"data\.prepare\.folder is only used with source=folder"),
        ({"source": "digits", "train_rows": 10}, r"data\.prepare\.train_rows only apply to source=fractals"),
        ({"source": "folder", "folder": "x", "instances": 2, "points": 9},
         r"data\.prepare\.instances, points only apply to source=fractals"),
        ({"source": "digits", "n_classes": 4}, r"n_classes=4, but digits have 10 classes"),
        ({"val_fraction": 0.1}, r"val_fraction is for digits/folder; fractals use val_rows"),
        ({"channels": 2}, "channels"),
        ({"shard_rows": 0}, "shard_rows"),
        ({"corpus": "builtin:pydoc"}, "corpus"),
    ],
)
def test_image_prepare_config_rejects_bad_values(kw, match):
    with pytest.raises(ValidationError, match=match):
        ImagePrepareConfig(out_dir="x", **kw)


def test_image_prepare_config_accepts_matching_digits_classes():
    assert ImagePrepareConfig(out_dir="x", source="digits", n_classes=10, val_fraction=0.3).val_fraction == 0.3


def test_data_spec_selects_the_prepare_config_by_kind(tmp_path):
    from data.prepare import PrepareConfig
    from trainers.config import DataSpec

    spec = DataSpec(path=str(tmp_path / "img"), prepare={"kind": "images", "source": "digits", "image_size": 8})
    pc = spec.prepare_config(overwrite=True)
    assert isinstance(pc, ImagePrepareConfig)
    assert (pc.source, pc.image_size, pc.overwrite, pc.out_dir) == ("digits", 8, True, tmp_path / "img")

    text = DataSpec(path=str(tmp_path / "txt"), prepare={"corpus": "builtin:pydoc"}).prepare_config()
    assert isinstance(text, PrepareConfig) and str(text.out_dir) == str(tmp_path / "txt")
    assert DataSpec(path="x").prepare_config() is None

    with pytest.raises(ValidationError, match=r"data\.prepare\.out_dir is not allowed"):
        DataSpec(path="x", prepare={"kind": "images", "out_dir": "y"})
    with pytest.raises(ValidationError, match=r"data\.prepare\.kind='audio' is not allowed; allowed: 'images'"):
        DataSpec(path="x", prepare={"kind": "audio"})
    with pytest.raises(ValidationError, match=r"data\.prepare\.folder is required"):
        DataSpec(path="x", prepare={"kind": "images", "source": "folder"})
