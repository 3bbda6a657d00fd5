"""Decoding speed of :func:`models.generate` with and without the KV cache.

    python benchmarks/generate.py [--preset tiny] [--prompt-len 8] [--new-tokens 64] [--repeats 5]
                                  [--out benchmarks/results/generate.json]

Builds the preset with random weights (float32, CPU unless --device), takes a short random prompt and
generates ``--new-tokens`` greedily, ``--repeats`` times per path after one warm-up run. Tokens/s is
new tokens / wall time, the median over the repeats. Both paths must produce the same tokens. Prints a
table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(model, prompt, *, new_tokens: int, repeats: int, use_cache: bool) -> tuple[dict, object]:
    import torch

    import models

    def run():
        return models.generate(model, prompt, max_new_tokens=new_tokens, temperature=0.0, use_cache=use_cache)

    out = run()  # warm-up
    times = []
    for _ in range(repeats):
        if prompt.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = run()
        if prompt.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    n = out.shape[1] - prompt.shape[1]
    return {
        "use_cache": use_cache,
        "new_tokens": n,
        "tokens_per_s": n / statistics.median(times),
        "seconds": times,
    }, out


def main(argv: list[str] | None = None) -> dict:
    import torch

    import models

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "generate.json"))
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = models.build(args.preset).to(args.device).eval()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.cfg.vocab_size, (args.batch, args.prompt_len), generator=g)
    prompt = prompt.to(args.device)
    rows = {}
    outputs = {}
    for use_cache in (False, True):
        rows[use_cache], outputs[use_cache] = measure(
            model, prompt, new_tokens=args.new_tokens, repeats=args.repeats, use_cache=use_cache
        )
    same = bool(torch.equal(outputs[False], outputs[True]))
    speedup = rows[True]["tokens_per_s"] / rows[False]["tokens_per_s"]
    result = {
        "preset": args.preset,
        "params": models.num_params(model.cfg),
        "cfg": model.cfg.model_dump(),
        "prompt_len": args.prompt_len,
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "without_cache": rows[False],
        "with_cache": rows[True],
        "speedup": speedup,
        "same_tokens": same,
    }
    print(f"{args.preset}: prompt {args.prompt_len} tokens, {args.new_tokens} new, batch {args.batch}, "
          f"{args.device}, {torch.get_num_threads()} threads")
    print(f"{'path':<14}{'tokens/s':>12}")
    print(f"{'no cache':<14}{rows[False]['tokens_per_s']:>12.1f}")
    print(f"{'KV cache':<14}{rows[True]['tokens_per_s']:>12.1f}")
    print(f"speedup x{speedup:.2f}; same tokens: {same}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if not same:
        raise SystemExit("the cached and uncached paths generated different tokens")
    return result


if __name__ == "__main__":
    main()
