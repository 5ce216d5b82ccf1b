"""Collecting every layer's hidden states of 1,000 short statements against a bare batched forward.

    .venv/bin/python benchmarks/probes.py             # 1,000 statements, 5 reps
    .venv/bin/python benchmarks/probes.py --quick     # 200 statements, 1 rep
    options: --device cuda  --threads N  --texts N  --reps N  --batch-size N  --site last|mean

**Collect**: ``collect_hidden`` end to end as the probes run it: tokenising the statements,
sorting them by length, padding each batch with an attention mask and position ids, one forward
of the attached model's base model per batch with a hook on the embeddings and on each of the
blocks reducing its output to the site ([B, d] per row), and the copy to the CPU.
**Bare**: the same model's base model over the very same batches (tokenised, sorted and padded
beforehand, untimed), under ``no_grad``, no hooks: the forward a plain PyTorch script would run
to get the last hidden state (it also runs the final norm; neither computes logits).
**Bare + logits**: the full causal-LM forward on the same batches, for reference.
Methods are rotated within every rep after a warm-up; figures are medians, in wall time and in
the process's CPU time (steadier when other jobs share the cores). The issue's target:
collect time ≤ bare time / 0.9 (ratio = bare / collect ≥ 0.9).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import fmt_time, machine_line, median, rotate, set_threads, spread, table  # noqa: E402

TARGET = 0.9
SUBJECTS = ["The cat", "My neighbour", "A doctor", "The river", "Our teacher", "The old car", "A small bird",
            "The city council", "Her brother", "The new phone", "A farmer", "The museum"]
VERBS = ["likes", "visited", "needs", "painted", "found", "lost", "described", "watched", "built", "sold"]
OBJECTS = ["the garden", "a red apple", "the bridge", "two books", "the morning train", "a quiet room",
           "the market", "an old map", "the letter", "a warm coat", "the mountain", "some bread"]


def statements(n: int, seed: int = 0) -> tuple[str, ...]:
    rng = np.random.default_rng(seed)
    return tuple(f"{SUBJECTS[rng.integers(len(SUBJECTS))]} {VERBS[rng.integers(len(VERBS))]} "
                 f"{OBJECTS[rng.integers(len(OBJECTS))]}." for _ in range(n))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--texts", type=int, default=1000)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--site", default="last", choices=["last", "mean"])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.texts, args.reps = 200, 1
    if args.threads:
        set_threads(args.threads)
    from explorer.analyses.hidden import collect_hidden, encode_all, pad_batch
    from explorer.core.session import ModelSession

    session = ModelSession.load(None, device=args.device)
    texts = statements(args.texts)
    seqs = encode_all(session, texts)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    batches = []
    for s in range(0, len(order), args.batch_size):
        ids, mask, pos, _ = pad_batch([seqs[i] for i in order[s:s + args.batch_size]], "right")
        batches.append((ids.to(session.device), mask.to(session.device), pos.to(session.device)))
    n_tokens = sum(len(s) for s in seqs)

    def sync():
        if session.device.type == "cuda":
            torch.cuda.synchronize()

    def collect():
        collect_hidden(session, texts=texts, sites=(args.site,), batch_size=args.batch_size)
        sync()

    def bare():
        with torch.no_grad():
            for ids, mask, pos in batches:
                session.hf.base_model(input_ids=ids, attention_mask=mask, position_ids=pos)
        sync()

    def bare_logits():
        with torch.no_grad():
            for ids, mask, pos in batches:
                session.hf(input_ids=ids, attention_mask=mask, position_ids=pos)
        sync()

    cpu: dict[str, list[float]] = {}
    times = rotate({"collect": collect, "bare": bare, "bare + logits": bare_logits}, reps=args.reps, cpu=cpu)
    print(machine_line())
    print(f"{args.texts} statements, {n_tokens} tokens, batch {args.batch_size}, site {args.site}, "
          f"{session.n_layers + 1} rows collected, device {session.device}\n")
    rows = [[name, fmt_time(median(t)), spread(t), f"{n_tokens / median(t):,.0f}"] for name, t in times.items()]
    print(table(rows, ["method", "median", "min–max", "tokens/s"]))
    ratio = median(times["bare"]) / median(times["collect"])
    per_rep = [b / c for b, c in zip(times["bare"], times["collect"])]
    print(f"\ncollect speed / bare forward speed = {ratio:.3f} (target ≥ {TARGET}); "
          f"per rep: {', '.join(f'{r:.2f}' for r in per_rep)}")
    print(f"collect speed / bare forward with logits = {median(times['bare + logits']) / median(times['collect']):.3f}")
    print(f"fastest run of each (least disturbed by other jobs): ratio {min(times['bare']) / min(times['collect']):.3f}")
    cpu_ratio = median(cpu["bare"]) / median(cpu["collect"])
    print(f"in CPU time (this process, all threads: steadier on shared cores): collect "
          f"{fmt_time(median(cpu['collect']))}, bare {fmt_time(median(cpu['bare']))}, ratio {cpu_ratio:.3f}; "
          f"per rep: {', '.join(f'{b / c:.2f}' for b, c in zip(cpu['bare'], cpu['collect']))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
