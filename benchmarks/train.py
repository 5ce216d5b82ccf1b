"""Steps/s of the intervention run loop vs a plain PyTorch training loop doing the same work.

Same model (both arms, one copy each), same batches (the run's own token streams), same
trainable parameters (``--train``), AdamW with the same groups, gradient clipping, both arms
alternating step by step. The run's per-step time is measured between its progress reports, so it
covers everything the loop does per step (per-arm RNG switching, learning-rate schedule, the
steps.jsonl lines, the progress report) but not the evaluations at the first and last step,
which are kept out of both loops (``eval_every`` and ``checkpoint_every`` are past the end).
Each timing is the median step time; the two loops alternate ``--reps`` times. The issue's target:
run/plain ≥ 0.9 in steps/s.

    python benchmarks/train.py [--model PATH] [--steps 12] [--reps 2] [--train last:4]
                               [--batch-size 8] [--seq-len 64] [--threads N]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, set_threads  # noqa: E402


def plain_loop(base, streams, config, steps: int) -> list[float]:
    """Two arms trained by a hand-written loop; returns the time of every step."""
    from explorer.core.adapters import adapter_for
    from explorer.training.intervene import select_trainable

    adapter = adapter_for(base.config.model_type)
    arms = []
    for name in ("control", "swapped"):
        model = copy.deepcopy(base)
        params = [p for _, p in select_trainable(model, adapter.blocks, adapter.final_norm, config.train)]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        arms.append((name, model, params, torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)))
    times = []
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        for name, model, params, opt in arms:
            model.train()
            ids = torch.as_tensor(streams.batch(name, step, config.batch_size))
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            for g in opt.param_groups:
                g["lr"] = config.lr_at(step)
            opt.step()
            opt.zero_grad(set_to_none=True)
            float(loss.detach())
        times.append(time.perf_counter() - t0)
    return times


class _Clock:
    """A job context that timestamps every progress report."""

    cancelled = False

    def __init__(self) -> None:
        self.stamps: dict[int, float] = {}

    def report(self, done, total, partial=None, message=""):
        self.stamps[done] = time.perf_counter()


def run_loop(model_dir, config, steps: int) -> list[float]:
    """Per-step times of ``run_intervention`` (steps 2 … steps−1: no evaluation, no checkpoint)."""
    from explorer.training.intervene import run_intervention

    clock = _Clock()
    with tempfile.TemporaryDirectory() as out:
        run_intervention(model_dir, config, out_dir=out, ctx=clock)
    s = clock.stamps
    return [s[k] - s[k - 1] for k in range(2, steps)]


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from explorer.core.session import resolve_model
    from explorer.training.intervene import InterventionConfig, build_streams

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--train", default="last:4")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        set_threads(args.threads)
    if args.steps < 4:
        raise SystemExit("--steps must be at least 4 (the first and last steps are not timed)")
    name, path = resolve_model(args.model)
    config = InterventionConfig(steps=args.steps, eval_every=args.steps + 1, checkpoint_every=args.steps + 1,
                                train=args.train, batch_size=args.batch_size, seq_len=args.seq_len,
                                eval_templates=1, eval_pairs=2, heldout_windows=1, device="cpu",
                                dtype="float32")
    # eval_every past the end still evaluates step 0 and the last step; those are not timed.
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    base.config.use_cache = False
    streams = build_streams(tokenizer, config)
    print(machine_line())
    print(f"{name}: train {args.train}, batch {args.batch_size} × {args.seq_len} tokens, two arms per step, "
          f"{args.steps} steps × {args.reps} reps")
    run_times, plain_times = [], []
    for rep in range(args.reps):
        # Alternate which goes first, so a slow spell of a shared machine hits both alike.
        order = ("run", "plain") if rep % 2 == 0 else ("plain", "run")
        for which in order:
            if which == "run":
                run_times += run_loop(path, config, args.steps)
            else:
                plain_times += plain_loop(base, streams, config, args.steps)[1:-1]
    run_s, plain_s = statistics.median(run_times), statistics.median(plain_times)
    print(f"plain PyTorch loop  {1 / plain_s:6.3f} steps/s  ({plain_s:.3f} s per step, both arms)")
    print(f"intervention run    {1 / run_s:6.3f} steps/s  ({run_s:.3f} s per step, both arms)")
    print(f"run / plain         {plain_s / run_s:6.3f}  (target ≥ 0.9)")


if __name__ == "__main__":
    main()
