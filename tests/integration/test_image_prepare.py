"""Image `rpt data prepare` end to end: fractals rendered by Ray Data tasks on the session's local Ray,
scikit-learn digits, a folder of PNGs, and the CLI.

Stored images are compared with images rendered or loaded independently (`FractalRows`, `load_digits`,
the PNG colours), not only with the manifest.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.fractals import FractalRows
from data.image_prepare import ImagePrepareConfig, prepare_images
from data.images import DIGIT_NAMES, load_digits
from data.manifest import ImageManifest, load_any_manifest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

FRACTAL = dict(source="fractals", n_classes=4, train_rows=90, val_rows=32, shard_rows=40, image_size=16, points=256)
PIXELS = 3 * 16 * 16


def _read_split(root: Path, split: str) -> dict[str, np.ndarray]:
    """A split's columns, shards concatenated in row-id order; images as (N, C*H*W) uint8."""
    man = ImageManifest.load(root)
    tables = [pq.read_table(p) for p in man.shard_paths(root, split)]
    out = {"row_id": np.concatenate([t["row_id"].to_numpy() for t in tables]),
           "labels": np.concatenate([t["labels"].to_numpy() for t in tables]),
           "images": np.concatenate([np.stack(t["images"].to_numpy(zero_copy_only=False)) for t in tables])}
    if "multi_labels" in tables[0].column_names:
        out["multi_labels"] = np.concatenate([np.stack(t["multi_labels"].to_numpy(zero_copy_only=False))
                                              for t in tables])
    return out


@pytest.fixture(scope="module")
def fractals(ray_session, tmp_path_factory) -> dict:
    """Three preparations: a and b with seed 0 (must be identical), c with seed 1."""
    root = tmp_path_factory.mktemp("fractals")
    out = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        summary = prepare_images(ImagePrepareConfig(**FRACTAL, seed=seed, out_dir=root / name), progress=False)
        out[name] = (root / name, summary)
    return out


def test_fractal_manifest_and_summary(fractals):
    root, summary = fractals["a"]
    assert {k: summary[k] for k in ("source", "n_classes", "train_rows", "val_rows", "train_shards", "val_shards",
                                    "shards")} == {
        "source": "fractals", "n_classes": 4, "train_rows": 90, "val_rows": 32, "train_shards": 3,
        "val_shards": 1, "shards": 4,
    }
    assert summary["images_per_s"] == pytest.approx(122 / summary["seconds"])
    man = load_any_manifest(root)
    assert isinstance(man, ImageManifest)
    assert (man.image_size, man.channels, man.n_classes, man.seed, man.instances) == (16, 3, 4, 0, 1)
    assert man.class_names == ["0", "1", "2", "3"]
    assert man.source["kind"] == "fractals" and man.source["points"] == 256
    assert [(s.path, s.rows, s.row_id_start) for s in man.splits["train"].shards] == [
        ("train/part-00000.parquet", 40, 0), ("train/part-00001.parquet", 40, 40), ("train/part-00002.parquet", 10, 80)]
    assert [(s.path, s.rows, s.row_id_start) for s in man.splits["val"].shards] == [("val/part-00000.parquet", 32, 0)]
    assert sorted(p.name for p in root.iterdir()) == ["manifest.json", "train", "val"]
    assert not list(root.parent.glob(".a.tmp-*"))  # the temp folder was renamed
    man.verify(root)


def test_fractal_shards_hold_the_rendered_rows(fractals):
    root, _ = fractals["a"]
    schema = pq.read_schema(root / "train/part-00000.parquet")
    assert schema.names == ["images", "labels", "row_id"]
    assert schema.field("images").type == pa.list_(pa.uint8(), PIXELS)
    assert schema.field("labels").type == pa.int64() and schema.field("row_id").type == pa.int64()

    train, val = _read_split(root, "train"), _read_split(root, "val")
    assert train["row_id"].tolist() == list(range(90))
    assert train["labels"].tolist() == [r % 4 for r in range(90)]
    assert val["row_id"].tolist() == list(range(32))
    assert val["labels"].tolist() == [(90 + j) % 4 for j in range(32)]  # 90 % 4 = 2: val starts at class 2
    assert train["images"].shape == (90, PIXELS) and val["images"].shape == (32, PIXELS)

    # the same pixels as FractalRows renders for train id r and val id 90 + j, in (C, H, W) order
    render = FractalRows(n_classes=4, seed=0, size=16, points=256)
    expect = render({"id": np.array([0, 45, 89, 90, 121])})["images"].reshape(5, -1)
    np.testing.assert_array_equal(train["images"][[0, 45, 89]], expect[:3])
    np.testing.assert_array_equal(val["images"][[0, 31]], expect[3:])
    assert len({img.tobytes() for img in np.concatenate([train["images"], val["images"]])}) == 122  # all differ


def test_fractal_prepare_is_deterministic_in_the_seed(fractals):
    (a, _), (b, _), (c, _) = fractals["a"], fractals["b"], fractals["c"]
    for rel in ("train/part-00000.parquet", "train/part-00002.parquet", "val/part-00000.parquet"):
        assert pq.read_table(a / rel).equals(pq.read_table(b / rel)), rel
    ta, tc = _read_split(a, "train"), _read_split(c, "train")
    assert ta["labels"].tolist() == tc["labels"].tolist()
    differ = (ta["images"] != tc["images"]).any(axis=1)
    assert differ.all(), f"{(~differ).sum()} images identical across seeds"


def test_verify_names_a_removed_or_corrupted_shard(fractals, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(fractals["a"][0], copy)
    man = ImageManifest.load(copy)
    table = pq.read_table(copy / "train/part-00001.parquet")
    pq.write_table(table.slice(0, 39), copy / "train/part-00001.parquet")
    with pytest.raises(ValueError, match=r"train shard .*part-00001\.parquet.* holds 39 rows, the manifest says 40"
                                         r".*rpt data prepare"):
        man.verify(copy)
    (copy / "val/part-00000.parquet").unlink()
    pq.write_table(table, copy / "train/part-00001.parquet")
    with pytest.raises(FileNotFoundError, match=r"val shard .*val/part-00000\.parquet.* is missing.*rpt data prepare"):
        man.verify(copy)


def test_multi_instance_fractals_have_multi_hot_labels(ray_session, tmp_path):
    cfg = ImagePrepareConfig(source="fractals", n_classes=5, instances=3, train_rows=12, val_rows=4, shard_rows=8,
                             image_size=16, points=128, channels=1, out_dir=tmp_path / "multi")
    prepare_images(cfg, progress=False)
    man = ImageManifest.load(tmp_path / "multi")
    assert man.instances == 3 and man.pixels == 256 and man.source["instances"] == 3
    train = _read_split(tmp_path / "multi", "train")
    assert pq.read_schema(tmp_path / "multi/train/part-00000.parquet").field("multi_labels").type == pa.list_(
        pa.uint8(), 5)
    assert train["multi_labels"].shape == (12, 5)
    assert (train["multi_labels"][np.arange(12), train["labels"]] == 1).all()  # the label's own bit is set
    assert set(train["multi_labels"].sum(1).tolist()) <= {1, 2, 3}
    expect = FractalRows(n_classes=5, seed=0, size=16, points=128, instances=3, channels=1)({"id": np.arange(12)})
    np.testing.assert_array_equal(train["multi_labels"], expect["multi_labels"])
    np.testing.assert_array_equal(train["images"], expect["images"].reshape(12, -1))


# ---- digits / folder ------------------------------------------------------------------------------


def test_digits_prepare_and_overwrite(tmp_path):
    out = tmp_path / "digits"
    cfg = dict(source="digits", image_size=8, channels=1, shard_rows=500, out_dir=out)
    summary = prepare_images(ImagePrepareConfig(**cfg), progress=False)
    man = ImageManifest.load(out)
    man.verify(out)
    assert (man.n_classes, man.class_names, man.channels, man.image_size) == (10, list(DIGIT_NAMES), 1, 8)
    assert man.source == {"kind": "digits", "val_fraction": 0.2}
    assert summary["train_rows"] + summary["val_rows"] == 1797
    assert [s.rows for s in man.splits["train"].shards] == [500, 500, summary["train_rows"] - 1000]

    ref = load_digits(size=8, channels=1)
    per_class = np.bincount(ref.labels)
    train, val = _read_split(out, "train"), _read_split(out, "val")
    assert np.bincount(val["labels"], minlength=10).tolist() == [round(n * 0.2) for n in per_class]
    assert train["row_id"].tolist() == list(range(len(train["row_id"])))
    assert len(set(train["labels"][:100].tolist())) == 10  # shuffled: classes mixed inside a shard
    # every stored (image, label) pair is one of the digits, each used once across both splits
    stored = sorted((img.tobytes(), int(lab)) for split in (train, val)
                    for img, lab in zip(split["images"], split["labels"], strict=True))
    assert stored == sorted((img.tobytes(), int(lab)) for img, lab in zip(ref.images.reshape(1797, -1), ref.labels,
                                                                          strict=True))

    with pytest.raises(FileExistsError, match=r"already exists and is not empty.*overwrite=True.*--overwrite"):
        prepare_images(ImagePrepareConfig(**cfg, seed=1), progress=False)
    assert ImageManifest.load(out).seed == 0  # untouched
    prepare_images(ImagePrepareConfig(**cfg, seed=1, overwrite=True), progress=False)
    assert ImageManifest.load(out).seed == 1
    assert _read_split(out, "val")["images"].tobytes() != val["images"].tobytes()  # another split
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits"]  # no temp or old folders left


def test_folder_prepare(tmp_path):
    from PIL import Image

    colours = {"cat": (250, 10, 10), "dog": (10, 10, 250)}
    for name, rgb in colours.items():
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (12, 10), rgb).save(tmp_path / "src" / name / f"{i}.png")
    cfg = dict(source="folder", folder=str(tmp_path / "src"), image_size=8, val_fraction=0.2, shard_rows=3)
    prepare_images(ImagePrepareConfig(**cfg, out_dir=tmp_path / "out"), progress=False)
    man = ImageManifest.load(tmp_path / "out")
    man.verify(tmp_path / "out")
    assert (man.n_classes, man.class_names, man.pixels) == (2, ["cat", "dog"], 192)
    assert man.source == {"kind": "folder", "path": str(tmp_path / "src"), "val_fraction": 0.2}
    assert [s.rows for s in man.splits["train"].shards] == [3, 3, 2] and man.splits["val"].rows == 2
    for split in ("train", "val"):
        d = _read_split(tmp_path / "out", split)
        images = d["images"].reshape(-1, 3, 8, 8)
        red_minus_blue = images[:, 0].astype(int).mean((1, 2)) - images[:, 2].astype(int).mean((1, 2))
        np.testing.assert_array_equal(red_minus_blue > 0, d["labels"] == 0)  # cat = 0 = red
        assert sorted(d["labels"].tolist()) == ([0] * 4 + [1] * 4 if split == "train" else [0, 1])

    with pytest.raises(ValueError, match=r"n_classes=3, but .*src.* has 2 class folders \(cat, dog\)"):
        prepare_images(ImagePrepareConfig(**cfg, n_classes=3, out_dir=tmp_path / "bad"), progress=False)
    assert not (tmp_path / "bad").exists()
    assert not list(tmp_path.glob(".bad.tmp-*"))  # the failed run's temp folder is gone


# ---- CLI ------------------------------------------------------------------------------------------


def test_cli_data_prepare_images(ray_session, tmp_path):
    from typer.testing import CliRunner

    from cluster.cli import app

    out = tmp_path / "digits"
    cfg = tmp_path / "img.yaml"
    cfg.write_text(f"name: img\nschedule: {{name: cosine, warmup_steps: 1}}\ndata:\n  path: {out}\n"
                   "  prepare: {kind: images, source: digits, image_size: 8, channels: 1}\n")
    runner = CliRunner()

    def text(result) -> str:  # rich wraps lines at the terminal width
        return " ".join((result.output + (getattr(result, "stderr", "") or "")).split())

    r = runner.invoke(app, ["data", "prepare", str(cfg)])
    assert r.exit_code == 0, r.output
    man = ImageManifest.load(out)
    assert man.splits["train"].rows + man.splits["val"].rows == 1797 and man.seed == 0
    r = runner.invoke(app, ["data", "prepare", str(cfg), "--if-missing"])
    assert r.exit_code == 0 and "is already prepared" in text(r)
    r = runner.invoke(app, ["data", "prepare", str(cfg)])
    assert r.exit_code == 2
    assert "already exists and is not empty" in text(r)
    r = runner.invoke(app, ["data", "prepare", str(cfg), "--overwrite", "data.prepare.seed=3"])
    assert r.exit_code == 0, r.output
    assert ImageManifest.load(out).seed == 3
