"""Time from `make run` (already set up) to the app answering its first page.

    .venv/bin/python benchmarks/startup.py [--reps 3] [--port 5099]

Starts `make run PORT=…` in its own process group, polls http://127.0.0.1:PORT/ until the page
(with the app's title) comes back, stops the server, and prints each time and the median. The
target here is ≤ 15 s. A plain-PyTorch reference is printed alongside: the time to import torch
and transformers and load the same model directory in a fresh interpreter, the floor any tool
built on them pays.
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TITLE = b"Interp Explorer"


def time_make_run(port: int, timeout: float = 120.0) -> float:
    start = time.perf_counter()
    proc = subprocess.Popen(["make", "run", f"PORT={port}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while time.perf_counter() - start < timeout:
            if proc.poll() is not None:
                raise SystemExit(f"make run exited with status {proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as reply:
                    if reply.status == 200 and TITLE in reply.read():
                        return time.perf_counter() - start
            except OSError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"the app did not answer within {timeout:.0f} s")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def time_plain_load() -> float:
    code = ("import time; t=time.perf_counter(); import torch, transformers;"
            "from explorer.core.defaults import ensure_default_model;"
            "m=transformers.AutoModelForCausalLM.from_pretrained(str(ensure_default_model()), dtype=torch.float32);"
            "transformers.AutoTokenizer.from_pretrained(str(ensure_default_model()));"
            "print(time.perf_counter()-t)")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--port", type=int, default=5099)
    args = parser.parse_args()
    runs = [time_make_run(args.port) for _ in range(args.reps)]
    plain = [time_plain_load() for _ in range(args.reps)]
    print("make run -> first page: " + ", ".join(f"{t:.1f} s" for t in runs)
          + f"; median {statistics.median(runs):.1f} s (target ≤ 15 s)")
    print("plain reference (fresh python: import torch + transformers, load the model and tokenizer): "
          + ", ".join(f"{t:.1f} s" for t in plain) + f"; median {statistics.median(plain):.1f} s; "
          f"ratio {statistics.median(runs) / statistics.median(plain):.2f}×")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
