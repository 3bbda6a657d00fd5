"""Procedural IFS fractals (data/fractals.py) and the real-image sources (data/images.py)."""

from __future__ import annotations

import numpy as np
import pytest

from data import fractals as Fr
from data import images as I


def test_sample_systems_is_seeded_and_contractive():
    a, b, c = Fr.sample_systems(50, 0), Fr.sample_systems(50, 0), Fr.sample_systems(50, 1)
    assert np.array_equal(a.A, b.A) and np.array_equal(a.probs, b.probs)
    assert not np.allclose(a.A, c.A)
    assert set(np.unique(a.n_maps)) <= {2, 3, 4} and len(a) == 50
    norms = a.spectral_norms()
    assert norms.max() < 0.95 + 1e-9  # every map a contraction
    np.testing.assert_allclose(a.probs.sum(1), 1.0)
    used = np.arange(4)[None] < a.n_maps[:, None]
    assert (a.probs[~used] == 0).all() and (a.probs[used] > 0).all()
    # the σ-factor Σ(σ1 + 2σ2) lies in Anderson & Farrell's range [(5 + N)/2, (6 + N)/2]
    sv = np.linalg.svd(a.A, compute_uv=False)  # (S, M, 2), descending
    factor = np.where(used, sv[..., 0] + 2 * sv[..., 1], 0).sum(1)
    assert ((factor >= (5 + a.n_maps) / 2 - 1e-9) & (factor <= (6 + a.n_maps) / 2 + 1e-9)).all()


def test_chaos_game_points_stay_in_the_attractor_bound():
    systems = Fr.sample_systems(20, 3)
    pts, which = Fr.chaos_game(systems, points=1000, rng=np.random.default_rng(0), chains=50)
    assert pts.shape == (20, 1000, 2) and which.shape == (20, 1000)
    # |w(x)| <= s|x| + |b| with s <= max spectral norm, |b| <= sqrt 2 and starts in [-1, 1]²:
    # every iterate stays within max(|x0|, sqrt 2 / (1 - s))
    s = systems.spectral_norms().max(axis=1)
    bound = np.sqrt(2) / (1 - s)
    assert (np.linalg.norm(pts, axis=-1) <= bound[:, None] + 1e-4).all()
    assert (which < systems.n_maps[:, None]).all()  # only maps in use
    assert np.isfinite(pts).all()


def test_render_is_deterministic_per_seed_and_differs_across_seeds():
    systems = Fr.sample_systems(4, 0).take([0, 1, 2, 3, 0])
    kw = dict(size=32, points=1024)
    a = Fr.render_batch(systems, rng=np.random.default_rng(5), **kw)
    b = Fr.render_batch(systems, rng=np.random.default_rng(5), **kw)
    c = Fr.render_batch(systems, rng=np.random.default_rng(6), **kw)
    assert a.shape == (5, 3, 32, 32) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    grey = Fr.render_batch(systems, rng=np.random.default_rng(5), colored=False, background="black", channels=1, **kw)
    assert grey.shape == (5, 1, 32, 32)
    cover = (grey > 0).mean(axis=(1, 2, 3))
    assert ((cover > 0.02) & (cover < 0.9)).all()  # a drawn shape on a background, not blank, not full
    assert set(np.unique(grey)) <= {0, 255}


def test_rows_do_not_depend_on_batching_and_are_labelled_by_row_id():
    rows = Fr.FractalRows(n_classes=3, seed=0, size=16, points=256)
    whole = rows({"id": np.arange(6)})
    parts = [rows({"id": np.arange(0, 2)}), rows({"id": np.arange(2, 6)})]
    assert np.array_equal(whole["images"], np.concatenate([p["images"] for p in parts]))
    assert whole["labels"].tolist() == [0, 1, 2, 0, 1, 2] and whole["labels"].dtype == np.int64
    assert not np.array_equal(whole["images"][0], whole["images"][3])  # same class, another instance


def test_multi_instance_images_have_multi_hot_labels():
    rows = Fr.FractalRows(n_classes=10, seed=0, size=32, points=256, instances=3)
    out = rows({"id": np.arange(4)})
    assert out["images"].shape == (4, 3, 32, 32) and out["multi_labels"].shape == (4, 10)
    assert (out["multi_labels"][np.arange(4), out["labels"]] == 1).all()
    assert (out["multi_labels"].sum(1) >= 1).all() and (out["multi_labels"].sum(1) <= 3).all()
    systems = Fr.sample_systems(5, 0)
    img, labels = Fr.render_multi(systems, np.array([[0, 1], [2, 2]]), size=32, points=256, rng=np.random.default_rng(0))
    assert labels.tolist() == [[1, 1, 0, 0, 0], [0, 0, 1, 0, 0]]


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="sigma_max"):
        Fr.sample_systems(3, 0, sigma_max=1.0)
    with pytest.raises(ValueError, match="background"):
        Fr.render_batch(Fr.sample_systems(1, 0), size=8, points=64, rng=np.random.default_rng(0), background="pink")
    with pytest.raises(ValueError, match="generators"):
        Fr.render_batch(Fr.sample_systems(2, 0), size=8, points=64, rng=[np.random.default_rng(0)])


# ---- real images ----------------------------------------------------------------------------------


def test_read_image_folder(tmp_path):
    from PIL import Image

    for name, colour, n in (("cat", (255, 0, 0), 2), ("dog", (0, 0, 255), 1)):
        (tmp_path / name).mkdir()
        for i in range(n):
            Image.new("RGB", (20, 10), colour).save(tmp_path / name / f"{i}.{'png' if i else 'JPG'}")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    s = I.read_image_folder(tmp_path, size=8)
    assert s.images.shape == (3, 3, 8, 8) and s.images.dtype == np.uint8
    assert s.labels.tolist() == [0, 0, 1] and s.class_names == ["cat", "dog"]
    assert s.images[2, 2].min() > 240 and s.images[2, 0].max() < 15  # blue dog
    assert I.read_image_folder(tmp_path, size=8, channels=1, resize="stretch").images.shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match="no images"):
        I.read_image_folder(tmp_path / "cat", size=8)


def test_load_digits_from_scikit_learn():
    d = I.load_digits()
    assert d.images.shape == (1797, 1, 8, 8) and d.images.dtype == np.uint8 and d.images.max() == 255
    assert sorted(np.unique(d.labels).tolist()) == list(range(10)) and d.class_names[7] == "seven"
    big = I.load_digits(size=16, channels=3)
    assert big.images.shape == (1797, 3, 16, 16)
    train, test = d.split(0.2, seed=0)
    assert len(train) + len(test) == 1797 and abs(len(test) - 359) <= 10
    assert set(np.unique(test.labels)) == set(range(10))
