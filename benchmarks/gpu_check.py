"""The GPU check: every benchmark's engine/reference ratio and the model tests' assertions on CUDA.

    make gpu-check                                   # bfloat16 on the first CUDA GPU
    .venv/bin/python benchmarks/gpu_check.py --dtype float32 --shapes llama3-8b,gemma2-9b

On a machine without CUDA it says so and exits 1 (nothing is run). On CUDA:

1. the ratios: ``benchmarks/scale.py``'s tasks (the logit lens of 128 tokens, head scores + DLA,
   the all-head sweep, a neuron index) on the embedded default model and on random-weight models
   of real shapes (2 blocks), engine against the plain-transformers reference, each in its own
   process, with time, peak GPU memory and the model's weight bytes;
2. the model tests: ``pytest -m model tests/model`` with the default model loaded on the GPU in
   ``--dtype`` (``EXPLORER_TEST_DEVICE``/``EXPLORER_TEST_DTYPE``, read by tests/conftest.py); the
   tests' plain references stay float32 on the CPU, so a bfloat16 run checks the assertions
   against float32 truth (tolerances written for float32 may fail there: the table says which).

Then one table: check, status, figures.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))


def no_cuda_message() -> str | None:
    """None when a CUDA GPU is usable, else why not (one line)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return f"no CUDA GPU is visible to torch {torch.__version__} ({built})"
    return None


def ratio_rows(args) -> list[list[str]]:
    import scale
    from common import fmt_time, median

    ns = argparse.Namespace(blocks=2, dtype=args.dtype, device=args.device, reps=args.reps, warmup=1,
                            index_tokens=args.index_tokens, threads=None)
    rows = []
    for shape in ["default"] + [s for s in args.shapes.split(",") if s]:
        for task in scale.TASKS:
            eng = scale.run_child(ns, shape, task, "engine")
            ref = scale.run_child(ns, shape, task, "reference")
            if "error" in eng or "error" in ref:
                why = " ".join(eng.get("error") or ref.get("error") or ["?"])
                rows.append([f"ratio {shape} {task}", "ERROR", why[:100]])
                continue
            t, rt = median(eng["seconds"]), median(ref["seconds"])
            rows.append([f"ratio {shape} {task}", f"{t / rt:.2f}×",
                         f"engine {fmt_time(t)}, reference {fmt_time(rt)}; GPU peak {scale.gib(eng['gpu_peak'])} "
                         f"(reference {scale.gib(ref['gpu_peak'])}), weights {scale.gib(eng['weights'])}"])
    return rows


def model_test_rows(args) -> list[list[str]]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        env = dict(os.environ, EXPLORER_TEST_DEVICE=args.device, EXPLORER_TEST_DTYPE=args.dtype,
                   HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-m", "model", "tests/model",
               f"--junitxml={report}"]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if not report.exists():
            return [["model tests", "ERROR", (proc.stdout + proc.stderr).strip().splitlines()[-1:][0][:100]]]
        counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        failed: dict[str, list[str]] = defaultdict(list)
        for case in ET.parse(report).getroot().iter("testcase"):
            module = case.get("classname", "?").split(".")[-1]
            if case.find("failure") is not None or case.find("error") is not None:
                counts[module]["failed"] += 1
                failed[module].append(case.get("name", "?"))
            elif case.find("skipped") is not None:
                counts[module]["skipped"] += 1
            else:
                counts[module]["passed"] += 1
    rows = []
    for module in sorted(counts):
        c = counts[module]
        status = "pass" if not c["failed"] else "FAIL"
        detail = f"{c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped"
        if failed[module]:
            detail += ": " + ", ".join(failed[module])[:120]
        rows.append([f"tests {module}", status, detail])
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--shapes", default="llama3-8b", help="random-weight shapes for the ratios (see scale.py)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--index-tokens", type=int, default=16384)
    ap.add_argument("--skip-tests", action="store_true", help="only the ratios")
    ap.add_argument("--skip-ratios", action="store_true", help="only the model tests")
    args = ap.parse_args(argv)
    why = no_cuda_message()
    if why is not None:
        print(f"gpu-check: {why}. This check needs a CUDA GPU: nothing was run.", file=sys.stderr)
        return 1
    import torch
    from common import table

    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"{args.dtype}", flush=True)
    rows = []
    if not args.skip_ratios:
        rows += ratio_rows(args)
    if not args.skip_tests:
        rows += model_test_rows(args)
    print(table(rows, ["check", "status", "figures"]))
    return 0 if all(r[1] not in ("ERROR", "FAIL") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
