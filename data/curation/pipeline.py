"""The curation stages on a Ray Dataset of documents (`text`, in corpus order), in order: exact dedup, near dedup,
filters, INGENIOUS selection (see :mod:`data.curation`).

Each stage computes its per-document facts in Ray Data tasks (normalised-text hashes, MinHash signatures, filter
verdicts, features), gathers those small columns to the driver with the documents' ids (corpus positions), decides
there (in corpus order: deterministic whatever the parallelism), and filters the dataset by id in Ray Data.
Driver memory per surviving document: 16 bytes (exact), 8 · num_perm bytes (near), 4 · features bytes (select).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from data.curation import exact, filters, near, select
from data.curation.config import CurationSpec

REMOVED_FILE = "curation_removed.parquet"


@dataclass
class Curated:
    docs: Any  # ray.data.Dataset, materialized, with `doc_id`
    stages: list[dict[str, Any]] = field(default_factory=list)  # {stage, documents_in, documents_out}
    removed: list[tuple[int, str, str]] = field(default_factory=list)  # (doc_id, stage, reason)

    def removed_table(self) -> pa.Table:
        ids, stages, reasons = zip(*self.removed, strict=True) if self.removed else ((), (), ())
        return pa.table({"doc_id": pa.array(ids, pa.int64()), "stage": pa.array(stages, pa.string()),
                         "reason": pa.array(reasons, pa.string())})


def _texts(table: pa.Table) -> list[str]:
    return table.column("text").to_pylist()


def _gather(docs, fn: Callable[[pa.Table], dict[str, np.ndarray]], compute=None, **kw) -> dict[str, np.ndarray]:
    """``fn`` over the documents in Ray Data tasks; its columns (with ``doc_id``) concatenated on the driver,
    sorted by ``doc_id``."""
    out = docs.map_batches(fn, batch_format="pyarrow", batch_size=256, compute=compute, **kw)
    parts: dict[str, list[np.ndarray]] = {}
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in batch.items():
            parts.setdefault(k, []).append(np.asarray(v))
    cols = {k: np.concatenate(v) for k, v in parts.items()}
    if not cols:
        return {}
    order = np.argsort(cols["doc_id"], kind="stable")
    return {k: v[order] for k, v in cols.items()}


def _keep_only(docs, ids: np.ndarray, keep: np.ndarray):
    """The documents whose id is in ``ids[keep]`` (a lookup table by id, shipped to the tasks once)."""
    table = np.zeros(int(ids.max()) + 1 if len(ids) else 1, dtype=bool)
    table[ids[keep]] = True

    def fn(batch: pa.Table) -> pa.Table:
        return batch.filter(pa.array(table[batch.column("doc_id").to_numpy()]))

    return docs.map_batches(fn, batch_format="pyarrow", batch_size=None).materialize()


class _Run:
    def __init__(self, docs, n: int):
        self.cur = Curated(docs)
        self.n = n

    def apply(self, stage: str, ids: np.ndarray, keep: np.ndarray, reasons: list[str]) -> None:
        self.cur.stages.append({"stage": stage, "documents_in": len(ids), "documents_out": int(keep.sum())})
        removed = np.flatnonzero(~keep)
        self.cur.removed.extend((int(ids[i]), stage, reasons[i]) for i in removed)
        if len(removed):
            self.cur.docs = _keep_only(self.cur.docs, ids, keep)


def _exact(run: _Run) -> None:
    got = _gather(run.cur.docs, lambda t: {"doc_id": t.column("doc_id").to_numpy(), "k": exact.keys(_texts(t))})
    ids, keys = got.get("doc_id", np.empty(0, np.int64)), got.get("k", np.empty((0, 2), np.uint64))
    keep = exact.first_occurrences(keys)
    first = {tuple(keys[i]): int(ids[i]) for i in np.flatnonzero(keep)}
    run.apply("dedup.exact", ids, keep, [f"copy of document {first[tuple(k)]}" for k in keys])


def _near(run: _Run, spec) -> None:
    def fn(t: pa.Table) -> dict[str, np.ndarray]:
        sig = near.signatures(_texts(t), ngram=spec.ngram, num_perm=spec.num_perm, seed=spec.seed)
        return {"doc_id": t.column("doc_id").to_numpy(), "sig": sig}

    got = _gather(run.cur.docs, fn)
    ids = got.get("doc_id", np.empty(0, np.int64))
    sigs = got.get("sig", np.empty((0, spec.num_perm), np.uint64)).astype(np.uint64)
    keep, of = near.near_duplicates(sigs, threshold=spec.threshold, bands=spec.bands, seed=spec.seed)
    run.apply("dedup.near", ids, keep, [f"near copy of document {ids[j]}" if j >= 0 else "" for j in of])


def _filters(run: _Run, spec) -> None:
    def fn(t: pa.Table) -> dict[str, np.ndarray]:
        why = filters.reasons(_texts(t), spec)
        return {"doc_id": t.column("doc_id").to_numpy(), "why": np.array([w or "" for w in why], dtype=object)}

    got = _gather(run.cur.docs, fn)
    ids, why = got.get("doc_id", np.empty(0, np.int64)), list(got.get("why", []))
    run.apply("filters", ids, np.array([not w for w in why], dtype=bool), why)


def _select(run: _Run, spec, seed: int, embed_folder: str | None) -> None:
    if embed_folder is None:
        def fn(t: pa.Table) -> dict[str, np.ndarray]:
            x = select.hashed_features(_texts(t), dim=spec.features, ngram=spec.ngram)
            return {"doc_id": t.column("doc_id").to_numpy(), "x": x}

        got = _gather(run.cur.docs, fn)
    else:
        import ray

        from data.curation.embed import ModelEmbedder

        got = _gather(run.cur.docs, ModelEmbedder, compute=ray.data.ActorPoolStrategy(size=1),
                      fn_constructor_args=(embed_folder, spec.max_tokens))
    ids = got.get("doc_id", np.empty(0, np.int64))
    keep = select.select(got.get("x", np.empty((0, 1), np.float32)), fraction=spec.fraction,
                         parts=spec.partitions, seed=seed)
    run.apply("select.ingenious", ids, keep, ["not selected (facility location)"] * len(ids))


def _require(module: str, setting: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ValueError(
            f"data.prepare.{setting} needs the `{module}` package, which is not installed: install the curation "
            "extra (pip install -e '.[curation]'; `make` installs it) or remove the setting"
        )


def curate(docs, spec: CurationSpec, *, seed: int, embed_folder: str | None = None) -> Curated:
    """Run the configured stages on ``docs`` (a materialized Ray Dataset with `text` and `doc_id`)."""
    if spec.dedup is not None and spec.dedup.near is not None:
        _require("datasketch", "dedup.near")
    if spec.select is not None:
        _require("submodlib", "select")
    run = _Run(docs, docs.count())
    d = spec.dedup
    if d is not None and d.exact:
        _exact(run)
    if d is not None and d.near is not None:
        _near(run, d.near)
    if spec.filters is not None:
        _filters(run, spec.filters)
    if spec.select is not None:
        _select(run, spec.select, seed, embed_folder)
    return run.cur


def with_ids(docs):
    """``docs`` with ``doc_id`` = corpus position (0, 1, ...), materialized."""
    import ray

    n = docs.count()
    ids = ray.data.range(n).rename_columns({"id": "doc_id"})
    return docs.zip(ids).materialize()
