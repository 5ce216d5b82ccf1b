"""Neuron index throughput against a bare forward pass over the same tokens, and peak memory.

    .venv/bin/python benchmarks/neurons.py            # full: a 1M-token memory run, then the whole default corpus × 3 reps
    .venv/bin/python benchmarks/neurons.py --quick    # smoke: a 4,096-token memory run, 1,024 tokens × 1 rep
    options: --device cuda  --threads N  --tokens N  --reps N  --memory-tokens N  --no-memory

**Index**: ``build_index`` end to end (with its statistics fused into compiled kernels, and plain), as a user runs it: tokenising the default corpus, one
forward per batch (of the attached model, hooked at its 30 MLP sites, not an nnsight trace), each
site reduced as the forward reaches it (the running
top-k / random sample / statistics / histogram updates on the device), the token work files,
checkpoints (one a minute) and the final write; a fresh output directory every run. **Bare**: a
separate plain copy of the model (never wrapped by nnsight) over the very same windows (tokenised
beforehand, untimed), in the same batches, under ``no_grad``, run exactly as far as the index
needs: up to the last block's MLP out-projection, where a forward pre-hook stops it (the index
stops there too, so neither computes the last down-projection, the final norm or any logits).
The two run in the same process, rotated within every rep after a warm-up; figures are medians.
The issue's target: index tokens/s ≥ 0.9 × bare tokens/s.

**Memory** (measured first): a separate subprocess (so nothing else in this process counts) loads the model,
writes a synthetic corpus (random words of the default corpus), builds an index over
``--memory-tokens`` tokens of it and reports its peak resident memory (``VmHWM``; ``ru_maxrss``
as a check), the resident memory right after loading the model, and on CUDA the peak GPU memory.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt_time, machine_line, median, rotate, set_threads, spread, table  # noqa: E402

TARGET = 0.9


def _status_kib(field: str) -> int:
    """A /proc/self/status memory field in KiB (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def mib(kib: float) -> str:
    return f"{kib / 1024:,.0f} MiB"


# ------------------------------------------------------------------ memory (child process)
def synthetic_corpus(path: Path, n_tokens: int, seed: int = 0) -> None:
    """Lines of random words drawn from the default corpus's vocabulary (≥ n_tokens tokens)."""
    from explorer.core.defaults import ensure_default_corpus

    words = sorted(set(ensure_default_corpus(progress=lambda *_: None).read_text(encoding="utf-8").split()))
    rng = np.random.default_rng(seed)
    n_words = int(n_tokens * 1.1) + 1000  # ≥ 1 token per word, and a margin
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(0, n_words, 200):
            f.write(" ".join(words[i] for i in rng.integers(len(words), size=200)) + "\n")


def memory_child(args) -> None:
    from explorer.core.session import ModelSession
    from explorer.neurons.index import IndexRequest, build_index

    if args.threads:
        set_threads(args.threads)
    session = ModelSession.load(args.model, device=args.device, dtype="float32")
    loaded_rss = _status_kib("VmRSS")
    if session.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    work = Path(tempfile.mkdtemp(prefix="neurons-bench-"))
    try:
        corpus = work / "synthetic.txt"
        synthetic_corpus(corpus, args.memory_child)
        t0 = time.perf_counter()
        index = build_index(session, IndexRequest(corpus_path=str(corpus), max_tokens=args.memory_child), out_dir=work / "index")
        seconds = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in (work / "index").rglob("*") if f.is_file())
        out = {"tokens": index.tokens_done, "seconds": seconds, "loaded_rss_kib": loaded_rss,
               "peak_rss_kib": _status_kib("VmHWM"),
               "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               "index_bytes": size, "corpus_bytes": corpus.stat().st_size,
               "gpu_peak_bytes": torch.cuda.max_memory_allocated() if session.device.type == "cuda" else None}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("RESULT " + json.dumps(out), flush=True)


def memory_run(args, n_tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", str(n_tokens), "--device", args.device]
    if args.model:
        cmd += ["--model", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"the memory run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# ------------------------------------------------------------------ throughput
def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: few tokens, one rep, a small memory run")
    ap.add_argument("--model", default=None, help="model directory (default: the embedded default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per timed run (default: the whole default corpus, 75,328; quick 1024)")
    ap.add_argument("--reps", type=int, default=None, help="timed reps (default 3; quick 1)")
    ap.add_argument("--batch-windows", type=int, default=16)
    ap.add_argument("--memory-tokens", type=int, default=None, help="tokens of the memory run (default 1M; quick 4096)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory run")
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child is not None:
        memory_child(args)
        return

    from transformers import AutoModelForCausalLM

    from explorer.core.corpus import iter_documents, token_windows
    from explorer.core.defaults import ensure_default_corpus
    from explorer.core.session import ModelSession
    from explorer.neurons.index import IndexRequest, build_index

    n_tokens = args.tokens or (1024 if args.quick else None)  # None: the whole corpus
    reps = args.reps or (1 if args.quick else 3)
    memory_tokens = args.memory_tokens or (4096 if args.quick else 1_000_000)
    if args.threads:
        set_threads(args.threads)
    # The memory run goes first: a forked child's ru_maxrss starts from the parent's RSS at the
    # fork, which is small only before this process loads its two copies of the model.
    memory = None if args.no_memory else memory_run(args, memory_tokens)

    session = ModelSession.load(args.model, device=args.device, dtype="float32")
    plain = AutoModelForCausalLM.from_pretrained(session.path, dtype=torch.float32, local_files_only=True)
    plain = plain.to(args.device).eval()
    plain.config.use_cache = False
    corpus = str(ensure_default_corpus(progress=lambda *_: None))
    request = IndexRequest(corpus_path=corpus, max_tokens=n_tokens, batch_windows=args.batch_windows)
    # Both ways the index computes its per-token statistics: fused into compiled kernels (what
    # builds of ≥ FUSE_MIN_TOKENS tokens use; compiled once, in the warm-up) and plain torch ops.
    requests = {"fused": replace(request, fused="on"), "plain": replace(request, fused="off")}
    windows = list(token_windows(iter_documents(corpus), session.tokenizer, request.window, n_tokens))
    ids = torch.from_numpy(np.stack([w.ids for w in windows])).to(args.device)
    batches = list(ids.split(request.batch_windows))
    tokens = ids.numel()
    info = session.info()
    print(f"{machine_line()}\nmodel {info.name} on {info.device} ({info.dtype}): {info.n_layers} layers × "
          f"{info.d_mlp} neurons = {info.n_layers * info.d_mlp:,} neurons indexed; {tokens:,} tokens "
          f"({len(windows)} windows of {request.window}, {request.batch_windows} per batch) of {Path(corpus).name}")

    def sync() -> None:
        if session.device.type == "cuda":
            torch.cuda.synchronize()

    root = Path(tempfile.mkdtemp(prefix="neurons-bench-"))
    runs = iter(range(10 ** 6))
    built: list = []

    def index_run(kind: str) -> None:
        out = root / f"run{next(runs)}"
        built.append(build_index(session, requests[kind], out_dir=out))
        sync()
        shutil.rmtree(out, ignore_errors=True)

    class Stop(Exception):
        """Raised at the last neuron site: the bare pass goes exactly as far as the index."""

    def stop(module, args):
        raise Stop

    last_site = plain.get_submodule(session.adapter.blocks)[-1].get_submodule(session.adapter.mlp_out)

    def bare_run() -> None:
        hook = last_site.register_forward_pre_hook(stop)
        try:
            with torch.no_grad():
                for batch in batches:
                    try:
                        plain(batch)
                    except Stop:
                        pass
        finally:
            hook.remove()
        sync()

    try:
        times = rotate({"index, fused statistics": lambda: index_run("fused"),
                        "index, plain statistics": lambda: index_run("plain"),
                        "bare forward": bare_run}, reps=reps, warmup=1)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert all(b.tokens_done == tokens for b in built), "the index and the bare pass saw different tokens"
    rows = []
    rate = {}
    for name, samples in times.items():
        rate[name] = tokens / median(samples)
        rows.append([name, f"{tokens:,}", fmt_time(median(samples)), f"{rate[name]:,.0f}", spread(samples)])
    print()
    print(table(rows, ["method", "tokens", "median", "tokens/s", "spread"]))
    print()
    for kind in ("fused", "plain"):
        name = f"index, {kind} statistics"
        ratio = rate[name] / rate["bare forward"]
        verdict = "meets" if ratio >= TARGET else "misses"
        # within a rep both ran back to back, so each rep's own ratio shows how steady the figure is
        per_rep = ", ".join(f"{b / i:.3f}" for b, i in zip(times["bare forward"], times[name]))
        print(f"index ({kind} statistics) / bare throughput: {ratio:.2f}x ({verdict} the target ≥ {TARGET}x; "
              f"{reps} rep(s), medians); per rep: {per_rep}")

    if memory is None:
        return
    m = memory
    print(f"\nmemory: an index over a {memory_tokens:,}-token synthetic corpus, built in a subprocess:")
    added = m["peak_rss_kib"] - m["loaded_rss_kib"]
    print(f"  peak RSS {mib(m['peak_rss_kib'])} (ru_maxrss {mib(m['ru_maxrss_kib'])}); after loading the model "
          f"{mib(m['loaded_rss_kib'])}, so the build adds {mib(added)}")
    if m["gpu_peak_bytes"] is not None:
        print(f"  peak GPU memory {m['gpu_peak_bytes'] / 2 ** 20:,.0f} MiB")
    print(f"  {m['tokens']:,} tokens in {m['seconds']:.1f} s ({m['tokens'] / m['seconds']:,.0f} tokens/s, "
          f"tokenising included); index on disk {m['index_bytes'] / 2 ** 20:,.1f} MiB, corpus "
          f"{m['corpus_bytes'] / 2 ** 20:,.1f} MiB")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
