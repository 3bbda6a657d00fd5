"""Procedural IFS fractal images: an unlimited, download-free labelled image set, rendered with numpy.

An iterated function system (IFS) is a set of affine maps w_k(x) = A_k x + b_k of the plane, each
chosen with probability p_k; if every A_k is a contraction the system has a unique attractor, drawn by
the chaos game: start anywhere, repeatedly apply a random map, plot the points after a short burn-in.
One system is one class (FractalDB, Kataoka et al., ACCV 2020); images of a class differ in colours,
background, placement, flip and the random walk.

Sampling (Anderson & Farrell, "Improving Fractal Pre-training", arXiv 2110.03091): each of
the N ∈ [2, 4] maps is A = R(θ) diag(σ1, σ2) R(φ) D with rotations R, random reflections D = diag(±1, ±1)
and singular values 1 > σ_max ≥ σ1 ≥ σ2 ≥ 0, so every map is a contraction; the singular values are drawn
so that the system's "σ-factor" Σ_k (σ1_k + 2 σ2_k) lies in [(5 + N)/2, (6 + N)/2], the range in which
the paper finds the attractors neither collapse to dust nor fill the plane. b ~ U(−1, 1)²,
p_k ∝ |det A_k| = σ1_k σ2_k.

Rendering is vectorised over every chain of every image at once: ``chains`` independent random walks per
image advance together in (B, chains) arrays; the only Python loop is over the ~points/chains iterations.
Points are rasterised with one ``np.bincount`` per channel.

Multi-instance images (several systems per image, multi-hot labels) compose instances rendered at a
smaller scale at random positions, later instances drawn over earlier ones.

For Ray Data: ``ray.data.range(n).map_batches(FractalRows(n_classes=..., seed=...))`` (see
:class:`FractalRows`); each row is rendered from its own row-id-seeded generator, so the images do not
depend on how rows are batched.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

RandomSource = np.random.Generator | Sequence[np.random.Generator]
"""One generator for the whole batch, or one per image (row-deterministic rendering)."""


@dataclass(frozen=True)
class IFSSystems:
    """S iterated function systems of up to M maps, as arrays (unused map slots have probability 0)."""

    A: np.ndarray  # (S, M, 2, 2) linear parts
    b: np.ndarray  # (S, M, 2) translations
    probs: np.ndarray  # (S, M) map probabilities, rows sum to 1
    n_maps: np.ndarray  # (S,) maps in use

    def __len__(self) -> int:
        return self.A.shape[0]

    def take(self, indices: np.ndarray | Sequence[int]) -> IFSSystems:
        """The systems at ``indices`` (repeats allowed): one row per image to render."""
        idx = np.asarray(indices, dtype=np.int64)
        return IFSSystems(self.A[idx], self.b[idx], self.probs[idx], self.n_maps[idx])

    def spectral_norms(self) -> np.ndarray:
        """(S, M) largest singular value of each map (0 for unused slots); < 1 means contractive."""
        norms = np.linalg.norm(self.A, ord=2, axis=(-2, -1))
        return np.where(self.probs > 0, norms, 0.0)


def _rotation(angle: np.ndarray) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.stack((np.stack((c, -s), -1), np.stack((s, c), -1)), -2)  # (..., 2, 2)


def sample_systems(
    n_classes: int, seed: int, *, n_maps: tuple[int, int] = (2, 4), sigma_max: float = 0.95
) -> IFSSystems:
    """``n_classes`` random contractive IFS (one per class), deterministic in ``seed``.

    Args:
        n_maps: (min, max) maps per system, uniform.
        sigma_max: bound on every singular value (< 1: every map is a contraction).
    """
    lo_maps, hi_maps = n_maps
    if n_classes < 1 or not 1 <= lo_maps <= hi_maps:
        raise ValueError(f"n_classes={n_classes}, n_maps={n_maps}: need n_classes >= 1 and 1 <= min <= max")
    if not 0 < sigma_max < 1:
        raise ValueError(f"sigma_max={sigma_max} is not allowed; allowed: 0 < sigma_max < 1 (contraction)")
    rng = np.random.default_rng(seed)
    S, M = n_classes, hi_maps
    N = rng.integers(lo_maps, hi_maps + 1, size=S)  # (S,)
    cap3 = 3 * sigma_max  # the most one map can add to the σ-factor (σ1 = σ2 = sigma_max)
    alpha = rng.uniform((5 + N) / 2, (6 + N) / 2)  # (S,) target σ-factor
    alpha = np.minimum(alpha, cap3 * N)  # only binds for very small sigma_max
    sig = np.zeros((S, M, 2))
    remaining = alpha.copy()
    for m in range(M):  # over map slots (<= 4), vectorised over systems
        active = m < N
        after = np.maximum(N - m - 1, 0)  # maps still to come
        lo = np.maximum(0.0, remaining - cap3 * after)
        hi = np.minimum(cap3, remaining)
        t = np.where(after == 0, remaining, rng.uniform(0, 1, S) * (hi - lo) + lo)  # this map's σ1 + 2σ2
        t = np.where(active, np.clip(t, 0.0, cap3), 0.0)
        s1 = t / 3 + rng.uniform(0, 1, S) * (np.minimum(sigma_max, t) - t / 3)  # σ1 in [t/3, min(cap, t)]
        s2 = (t - s1) / 2  # so that σ2 <= σ1 and σ1 + 2σ2 = t
        sig[:, m] = np.stack((s1, s2), -1)
        remaining = remaining - t
    theta, phi = rng.uniform(0, 2 * np.pi, (S, M)), rng.uniform(0, 2 * np.pi, (S, M))
    D = rng.choice([-1.0, 1.0], size=(S, M, 2))
    A = _rotation(theta) @ (sig[..., :, None] * np.eye(2)) @ _rotation(phi) @ (D[..., :, None] * np.eye(2))
    b = rng.uniform(-1, 1, (S, M, 2))
    used = np.arange(M)[None, :] < N[:, None]
    det = np.where(used, sig[..., 0] * sig[..., 1], 0.0) + used * 1e-6  # a degenerate map still gets picked
    probs = det / det.sum(1, keepdims=True)
    return IFSSystems(A=A, b=b, probs=probs, n_maps=N)


# ---------------------------------------------------------------------------------------------------
# Random numbers, per batch or per row
# ---------------------------------------------------------------------------------------------------


def _draw(rng: RandomSource, n: int, fn: Callable[[np.random.Generator, int], np.ndarray]) -> np.ndarray:
    """``fn(generator, rows)`` for the batch: one call with ``n`` rows, or one call per row's generator."""
    if isinstance(rng, np.random.Generator):
        return fn(rng, n)
    if len(rng) != n:
        raise ValueError(f"{len(rng)} generators for {n} images; give one generator or one per image")
    return np.concatenate([fn(r, 1) for r in rng])


# ---------------------------------------------------------------------------------------------------
# Chaos game and rasterisation
# ---------------------------------------------------------------------------------------------------


def chaos_game(
    systems: IFSSystems, *, points: int, rng: RandomSource, chains: int = 128, burn_in: int = 12
) -> tuple[np.ndarray, np.ndarray]:
    """Points on each system's attractor: (B, P, 2) float32 and the index of the map that produced each
    point (B, P) int64, P = ceil(points / chains) · chains. All B · chains walks advance together."""
    B, M = systems.A.shape[:2]
    steps = math.ceil(points / chains)
    T = burn_in + steps
    u = _draw(rng, B, lambda g, n: g.random((n, T, chains), dtype=np.float32))  # (B, T, C) map choices
    x = _draw(rng, B, lambda g, n: g.uniform(-1, 1, (n, chains, 2))).astype(np.float32)  # (B, C, 2) starts
    cum = np.cumsum(systems.probs, axis=1).astype(np.float32)  # (B, M)
    cum[:, -1] = 2.0  # rounding: every u < 1 maps to a valid slot
    k_all = (u[..., None] >= cum[:, None, None, :]).sum(-1)  # (B, T, C) map index of every step
    params = np.concatenate((systems.A.reshape(B, M, 4), systems.b), axis=2).astype(np.float32)  # (B, M, 6)
    pts = np.empty((B, 2, steps, chains), dtype=np.float32)  # coordinate-major: fast per-axis reductions later
    for t in range(T):  # iterations of the walks; every point of every image advances at once
        p = np.take_along_axis(params, k_all[:, t, :, None], axis=1)  # (B, C, 6)
        x = np.stack(
            (p[..., 0] * x[..., 0] + p[..., 1] * x[..., 1] + p[..., 4],
             p[..., 2] * x[..., 0] + p[..., 3] * x[..., 1] + p[..., 5]),
            axis=-1,
        )
        if t >= burn_in:
            pts[:, :, t - burn_in] = x.transpose(0, 2, 1)
    which = k_all[:, burn_in:].reshape(B, -1)
    return pts.reshape(B, 2, -1).transpose(0, 2, 1), which  # (B, P, 2) view, (B, P)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB, all in [0, 1]; output (..., 3)."""
    i = np.floor(h * 6).astype(np.int64) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack(
        [np.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))], 0
    )  # (6, ..., 3)
    return np.take_along_axis(table, i[None, ..., None], axis=0)[0]


def rasterize(
    pts: np.ndarray,
    which: np.ndarray,
    *,
    size: int,
    rng: RandomSource,
    colored: bool = True,
    scale_range: tuple[float, float] = (0.8, 1.0),
    flip: bool = True,
    n_colors: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw point sets (B, P, 2) into (B, 3, size, size) float colours in [0, 1] and (B, size, size) coverage.

    Each image's points are fitted (aspect kept) into a square of side ``scale``·size, scale ~ U(scale_range),
    at a uniform random position, optionally mirrored. Coloured: each map of each image gets a random bright
    colour and a pixel takes the mean colour of its points; otherwise white. ``n_colors``: palette size per
    image, at least the number of map slots (keep it fixed, e.g. ``systems.A.shape[1]``, so that the random
    draws of an image do not depend on the rest of the batch).
    """
    B, P, _ = pts.shape
    M = n_colors if n_colors is not None else (int(which.max()) + 1 if which.size else 1)
    lo, hi = pts.min(axis=1), pts.max(axis=1)  # (B, 2)
    extent = np.maximum((hi - lo).max(axis=1), 1e-6)  # (B,)
    scale = _draw(rng, B, lambda g, n: g.uniform(*scale_range, n))
    side = scale * (size - 1)  # (B,) pixels spanned by the longer axis
    slack = (size - 1) - side[:, None] * (hi - lo) / extent[:, None]  # (B, 2) free room per axis
    offset = _draw(rng, B, lambda g, n: g.random((n, 2))) * slack
    mirror = _draw(rng, B, lambda g, n: g.random(n)) < (0.5 if flip else 0.0)
    xy = (pts - lo[:, None]) / extent[:, None, None] * side[:, None, None] + offset[:, None]  # (B, P, 2) pixels
    xy[..., 0] = np.where(mirror[:, None], (size - 1) - xy[..., 0], xy[..., 0])
    ij = np.clip(np.rint(xy).astype(np.int64), 0, size - 1)
    flat = (np.arange(B)[:, None] * size + ij[..., 1]) * size + ij[..., 0]  # (B, P): row y, column x
    if colored:
        # one integer histogram over (pixel, map) instead of a weighted one per colour channel
        per_map = np.bincount((flat * M + which).ravel(), minlength=B * size * size * M)
        per_map = per_map.reshape(B, size * size, M).astype(np.float32)
        count = per_map.sum(-1)  # (B, HW)
        hsv = _draw(rng, B, lambda g, n: np.stack(
            (g.random((n, M)), g.uniform(0.5, 1.0, (n, M)), g.uniform(0.7, 1.0, (n, M))), -1))  # (B, M, 3)
        palette = _hsv_to_rgb(hsv[..., 0], hsv[..., 1], hsv[..., 2]).astype(np.float32)  # (B, M, 3)
        rgb = np.matmul(per_map, palette) / np.maximum(count, 1)[..., None]  # (B, HW, 3) mean colour
        colour = rgb.transpose(0, 2, 1).reshape(B, 3, size, size)
        coverage = (count > 0).astype(np.float32).reshape(B, size, size)
    else:
        count = np.bincount(flat.ravel(), minlength=B * size * size).reshape(B, size, size)
        coverage = (count > 0).astype(np.float32)
        colour = np.broadcast_to(coverage[:, None], (B, 3, size, size)).astype(np.float32)
    return colour, coverage


def _backgrounds(n: int, size: int, background: str, rng: RandomSource) -> np.ndarray:
    if background == "black":
        return np.zeros((n, 3, size, size), np.float32)
    if background == "random":
        rgb = _draw(rng, n, lambda g, k: g.uniform(0.0, 0.6, (k, 3))).astype(np.float32)  # dark-ish, for contrast
        return np.broadcast_to(rgb[:, :, None, None], (n, 3, size, size)).copy()
    raise ValueError(f"background={background!r} is not allowed; allowed: 'random', 'black'")


def _to_uint8(img: np.ndarray, channels: int) -> np.ndarray:
    if channels == 1:
        img = img.mean(axis=1, keepdims=True)
    elif channels != 3:
        raise ValueError(f"channels={channels} is not allowed; allowed: 1 or 3")
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def render_batch(
    systems: IFSSystems,
    *,
    size: int,
    points: int,
    rng: RandomSource,
    colored: bool = True,
    background: Literal["random", "black"] = "random",
    channels: int = 3,
    chains: int = 128,
    scale_range: tuple[float, float] = (0.8, 1.0),
) -> np.ndarray:
    """One image per system row: uint8 (B, channels, size, size) (use ``systems.take(labels)``).

    ``points`` per image (rounded up to a multiple of ``chains``); ``rng`` one generator or one per image.
    """
    pts, which = chaos_game(systems, points=points, rng=rng, chains=chains)
    colour, cover = rasterize(pts, which, size=size, rng=rng, colored=colored, scale_range=scale_range,
                              n_colors=systems.A.shape[1])
    bg = _backgrounds(len(systems), size, background, rng)
    img = bg * (1 - cover[:, None]) + colour * cover[:, None]
    return _to_uint8(img, channels)


def render_multi(
    systems: IFSSystems,
    class_ids: np.ndarray,
    *,
    size: int,
    points: int,
    rng: RandomSource,
    colored: bool = True,
    background: Literal["random", "black"] = "random",
    channels: int = 3,
    chains: int = 128,
    scale_range: tuple[float, float] = (0.4, 0.65),
) -> tuple[np.ndarray, np.ndarray]:
    """Images with K fractals each: ``class_ids`` (B, K) rows of ``systems``. Returns uint8 images
    (B, channels, size, size) and multi-hot labels (B, len(systems)) uint8. ``points`` per instance.

    With per-image generators (``rng`` a sequence of B generators) each image's instances use its generator.
    """
    class_ids = np.asarray(class_ids, dtype=np.int64)
    B, K = class_ids.shape
    inst_rng: RandomSource = rng if isinstance(rng, np.random.Generator) else [g for g in rng for _ in range(K)]
    flat_systems = systems.take(class_ids.reshape(-1))
    pts, which = chaos_game(flat_systems, points=points, rng=inst_rng, chains=chains)
    colour, cover = rasterize(pts, which, size=size, rng=inst_rng, colored=colored, scale_range=scale_range,
                              n_colors=systems.A.shape[1])
    colour = colour.reshape(B, K, 3, size, size)
    cover = cover.reshape(B, K, size, size)
    img = _backgrounds(B, size, background, rng)
    for k in range(K):  # over instances (a handful): later ones drawn on top
        a = cover[:, k, None]
        img = img * (1 - a) + colour[:, k] * a
    labels = np.zeros((B, len(systems)), dtype=np.uint8)
    np.put_along_axis(labels, class_ids, 1, axis=1)
    return _to_uint8(img, channels), labels


# ---------------------------------------------------------------------------------------------------
# Ray Data source
# ---------------------------------------------------------------------------------------------------


class FractalRows:
    """``map_batches`` callable: row ids -> ``{"images": uint8 (B, C, size, size), "labels": int64 (B,)}``.

    Row r shows class ``r % n_classes`` (balanced; shuffle downstream if needed), rendered from the
    generator seeded with (seed, r), so a row's image is the same whatever the batching. With
    ``instances`` > 1 each image holds that many systems (the others drawn at random from the row's
    generator), ``labels`` is the first one's class and ``multi_labels`` (B, n_classes) uint8 is multi-hot.

    Use: ``ray.data.range(n_rows).map_batches(FractalRows(n_classes=100, seed=0, size=32))``
    (``ray.data.range`` names its column ``id``).
    """

    def __init__(
        self,
        *,
        n_classes: int,
        seed: int,
        size: int = 32,
        points: int | None = None,
        instances: int = 1,
        colored: bool = True,
        background: Literal["random", "black"] = "random",
        channels: int = 3,
        id_column: str = "id",
    ):
        if instances < 1:
            raise ValueError(f"instances={instances} is not allowed; allowed: >= 1")
        self.systems = sample_systems(n_classes, seed)
        self.n_classes, self.seed, self.size = n_classes, seed, size
        self.points = points if points is not None else default_points(size)
        self.instances, self.colored, self.background, self.channels = instances, colored, background, channels
        self.id_column = id_column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = np.asarray(batch[self.id_column], dtype=np.int64)
        rngs = [np.random.default_rng([self.seed, int(r)]) for r in ids]
        labels = ids % self.n_classes
        kw = dict(size=self.size, points=self.points, colored=self.colored, background=self.background,
                  channels=self.channels)
        if self.instances == 1:
            images = render_batch(self.systems.take(labels), rng=rngs, **kw)
            return {"images": images, "labels": labels}
        others = np.stack([g.integers(0, self.n_classes, self.instances - 1) for g in rngs])  # (B, K-1)
        class_ids = np.concatenate((labels[:, None], others), axis=1)
        images, multi = render_multi(self.systems, class_ids, rng=rngs, **kw)
        return {"images": images, "labels": labels, "multi_labels": multi}


def default_points(size: int) -> int:
    """Chaos-game points per image: 2 per pixel (enough to draw a 32-64 px attractor without holes)."""
    return 2 * size * size


def measure_throughput(*, size: int = 64, batch: int = 256, n_classes: int = 100, seconds: float = 3.0,
                       points: int | None = None) -> float:
    """Images per second of :func:`render_batch` on this process (one core), single-instance, coloured."""
    systems = sample_systems(n_classes, 0)
    rng = np.random.default_rng(0)
    pts = points if points is not None else default_points(size)
    render_batch(systems.take(np.arange(batch) % n_classes), size=size, points=pts, rng=rng)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        render_batch(systems.take(rng.integers(0, n_classes, batch)), size=size, points=pts, rng=rng)
        done += batch
    return done / (time.perf_counter() - start)
