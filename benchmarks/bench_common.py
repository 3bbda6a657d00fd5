"""What the benchmark scripts share: one measurement per child process (`--one SPEC` prints `RESULT {json}`), and
writing the results JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT = "RESULT "


def run_child(script: str, spec: dict, *, timeout_s: float, env: dict[str, str] | None = None) -> dict:
    """``python SCRIPT --one SPEC`` in a fresh process; its ``RESULT`` line as a dict, or ``{"error": ...}`` (the
    last line it printed, or the timeout)."""
    try:
        r = subprocess.run([sys.executable, script, "--one", json.dumps(spec)], capture_output=True, text=True,
                           env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}, timeout=timeout_s,
                           cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout_s:.0f} s"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(RESULT)]
    if r.returncode != 0 or not lines:
        return {"error": (r.stderr or r.stdout).strip().splitlines()[-1:] or [f"exit {r.returncode}"]}
    return json.loads(lines[-1][len(RESULT):])


def print_result(result: dict) -> None:
    """The child's side of :func:`run_child`."""
    print(RESULT + json.dumps(result), flush=True)


def write_json(res: dict, out: str | Path) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")
