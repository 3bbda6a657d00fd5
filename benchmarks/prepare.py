"""`rpt data prepare` throughput against the `tokenizers` library, and the driver's peak memory against corpus size.

    python benchmarks/prepare.py [--small 150] [--large 1500] [--out benchmarks/results/prepare.json]

Corpus: JSONL files of N documents built from the files of `builtin:stdlib-py` (the Python standard library's
sources: every installation has them), repeated with a copy number on each document's first line when N exceeds
them, for N = `--small` and `--large` (10x). Each prepare runs in its own process (its driver's peak resident
memory is that process's `ru_maxrss`; Ray's workers are other processes), on the same local Ray CPUs:

- `prepare_trained`: the whole `rpt data prepare` (read, split, tokenizer training, tokenize + pack, shards);
- `prepare_given`: the same with that tokenizer given (no training): the tokenize-pack-write path;
- `encode_batch`: `tokenizers`' own `Tokenizer.encode_batch` on the same documents with the same tokenizer, in
  this process with all its threads: the reference for tokens/s.

Prints a table and writes JSON (tokens/s, seconds, peak driver RSS, the ratio of `prepare_given` to `encode_batch`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench_common import print_result, run_child, write_json  # noqa: E402


def one(spec: dict) -> dict:
    """One prepare in this process; its summary and this driver's peak RSS."""
    from cluster.ray_env import init_ray
    from data.prepare import PrepareConfig, prepare

    init_ray(None, dashboard=False)
    cfg = PrepareConfig(corpus=spec["corpus"], out_dir=spec["out"], seq_len=512, vocab_size=8192,
                        num_actors=os.cpu_count() or 2, tokenizer=spec.get("tokenizer"))
    summary = prepare(cfg, progress=False)
    summary["driver_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return summary


def run_one(spec: dict) -> dict:
    out = run_child(__file__, spec, timeout_s=1800)
    if "error" in out:
        raise SystemExit(f"prepare failed: {out['error']}")
    return out


def write_corpus(path: Path, docs: int) -> None:
    from data.corpus import resolve_corpus

    files = resolve_corpus("builtin:stdlib-py").paths
    with open(path, "w", encoding="utf-8") as f:
        for i in range(docs):
            text = Path(files[i % len(files)]).read_text(encoding="utf-8")
            f.write(json.dumps({"text": f"# copy {i // len(files)}\n{text}"}) + "\n")


def encode_batch(corpus: Path, tokenizer: str) -> dict:
    """`tokenizers`' own batch encoding of the same documents (all of this process's threads)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    from tokenizers import Tokenizer

    texts = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]
    tok = Tokenizer.from_file(tokenizer)
    t0 = time.perf_counter()
    enc = tok.encode_batch(texts, add_special_tokens=False)
    seconds = time.perf_counter() - t0
    tokens = sum(len(e.ids) for e in enc) + len(texts)  # + one EOS a document, as prepare counts
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=150)
    ap.add_argument("--large", type=int, default=1500)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/prepare.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print_result(one(json.loads(a.one)))
        return
    res: dict = {"host": platform.node(), "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                 "corpus": "builtin:stdlib-py files as JSONL", "runs": {}}
    keys = ("documents", "tokens", "seconds", "tokens_per_s", "driver_peak_rss_mb", "train_rows", "shards")
    with tempfile.TemporaryDirectory() as tmp:
        for label, docs in (("small", a.small), ("large", a.large)):
            corpus = Path(tmp, f"{label}.jsonl")
            write_corpus(corpus, docs)
            trained = run_one({"out": f"{tmp}/{label}", "corpus": str(corpus)})
            given = run_one({"out": f"{tmp}/{label}-given", "corpus": str(corpus),
                             "tokenizer": f"{tmp}/{label}/tokenizer.json"})
            ref = encode_batch(corpus, f"{tmp}/{label}/tokenizer.json")
            res["runs"][label] = {"prepare_trained": {k: trained[k] for k in keys},
                                  "prepare_given": {k: given[k] for k in keys}, "encode_batch": ref,
                                  "ratio_given_vs_encode_batch": given["tokens_per_s"] / ref["tokens_per_s"]}
    small, large = res["runs"]["small"], res["runs"]["large"]
    res["driver_rss_growth"] = (large["prepare_trained"]["driver_peak_rss_mb"]
                                / small["prepare_trained"]["driver_peak_rss_mb"])
    from rich.console import Console
    from rich.table import Table

    t = Table(title="rpt data prepare (stdlib-py documents)")
    for col in ("corpus", "run", "documents", "tokens", "seconds", "tokens/s", "driver peak RSS MB"):
        t.add_column(col)
    for label, r in res["runs"].items():
        for run in ("prepare_trained", "prepare_given"):
            x = r[run]
            t.add_row(label, run, f"{x['documents']:,}", f"{x['tokens']:,}", f"{x['seconds']:.1f}",
                      f"{x['tokens_per_s']:,.0f}", f"{x['driver_peak_rss_mb']:,.0f}")
        e = r["encode_batch"]
        t.add_row(label, "tokenizers encode_batch", "", f"{e['tokens']:,}", f"{e['seconds']:.1f}",
                  f"{e['tokens_per_s']:,.0f}", "")
    Console().print(t)
    write_json(res, a.out)


if __name__ == "__main__":
    main()
