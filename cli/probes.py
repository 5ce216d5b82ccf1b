"""``python -m explorer probe | ccs | patchscope``: what each layer knows, read three ways."""
from __future__ import annotations

import math
import sys

from cli.common import add_model_args, add_snapshot_arg, load_session, log, maybe_snapshot, print_json
from explorer.core.errors import ExplorerError


class _Progress:
    """A job context for the CLI: a tqdm bar on stderr."""

    cancelled = False

    def __init__(self, unit: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=0, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False)

    def report(self, done: int, total: int, partial=None, message: str = "") -> None:
        self.bar.total, self.bar.n = total, done
        self.bar.set_description_str(message, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _fmt(v: float) -> str:
    return "   n/a" if v is None or math.isnan(v) else f"{v:6.3f}"


def cmd_probe(args) -> int:
    from explorer.analyses.probes import (
        ProbeRequest,
        check_request,
        load_data,
        run_probes,
        save_probe,
        save_steering_vector,
    )

    data = load_data(args.data)  # a bad file fails before the model loads
    request = ProbeRequest(data.texts, data.labels, site=args.site, folds=args.folds, C=args.C, seed=args.seed,
                           batch_size=args.batch_size, data_name=data.name, groups=data.groups)
    check_request(request)
    session = load_session(args)
    bar = _Progress("step")
    try:
        result = run_probes(session, request, ctx=bar)
    finally:
        bar.close()
    maybe_snapshot(args, session, result, f"probes: {data.name}")
    for path, save in ((args.save_vector, save_steering_vector), (args.save_probe, save_probe)):
        if path:
            log(f"wrote {save(result, path)}")
    if args.json:
        print_json(result.summary())
        return 0
    print(f"{result.model}: {result.n} texts ({data.name}; {result.label_names[0]!r} {result.class_counts[0]}, "
          f"{result.label_names[1]!r} {result.class_counts[1]}), site {args.site}, {args.folds}-fold"
          f"{' by group' if data.groups else ''}; chance {result.chance:.3f}")
    print(f"{'row':>6}  {'accuracy':>8} {'± SE':>6}  {'control':>7}")
    for i, label in enumerate(result.layer_labels):
        mark = "  <- best" if i == result.best_row else ""
        print(f"{label:>6}  {_fmt(result.accuracy[i]):>8} {_fmt(result.accuracy_se[i])}  "
              f"{_fmt(result.control_accuracy[i]):>7}{mark}")
    return 0


def cmd_ccs(args) -> int:
    from explorer.analyses.ccs import CCSRequest, builtin_pairs, check_request, load_pairs, run_ccs
    from explorer.analyses.probes import builtin_sets

    pairs = builtin_pairs(args.data) if args.data in builtin_sets() else load_pairs(args.data)
    request = CCSRequest(pairs.pos, pairs.neg, pairs.labels, site=args.site, restarts=args.restarts,
                         epochs=args.epochs, seed=args.seed, batch_size=args.batch_size, data_name=pairs.name,
                         train_fraction=args.train_fraction, groups=pairs.groups)
    check_request(request)
    session = load_session(args)
    bar = _Progress("step")
    try:
        result = run_ccs(session, request, ctx=bar)
    finally:
        bar.close()
    maybe_snapshot(args, session, result, f"ccs: {pairs.name}")
    if args.json:
        print_json(result.summary())
        return 0
    print(f"{result.model}: {pairs.size} pairs ({pairs.name}), {result.n_train} to train (their labels fix the "
          f"sign only), {result.n_test} held out; chance {result.chance:.3f}")
    print(f"{'row':>6}  {'CCS':>6} {'± SE':>6}  {'control':>7}  {'superv.':>7}  {'lens':>6}  "
          f"{'consist.':>8} {'confid.':>8}")
    for i, label in enumerate(result.layer_labels):
        print(f"{label:>6}  {_fmt(result.accuracy[i])} {_fmt(result.accuracy_se[i])}  "
              f"{_fmt(result.control_accuracy[i]):>7}  {_fmt(result.supervised_accuracy[i]):>7}  "
              f"{_fmt(result.lens_accuracy[i])}  {result.loss_consistency[i]:8.4f} {result.loss_confidence[i]:8.4f}")
    return 0


def cmd_patchscope(args) -> int:
    from explorer.analyses.patchscope import DEFAULT_IDENTITY, PatchscopeRequest, patchscope

    if not 1 <= args.top_k <= 100:
        raise ExplorerError(f"--top-k must be between 1 and 100, got {args.top_k}")
    identity = DEFAULT_IDENTITY if args.identity is None else args.identity.encode().decode("unicode_escape")
    session = load_session(args)
    result = patchscope(session, PatchscopeRequest(args.prompt, (args.position,), identity, args.placeholder,
                                                   top_k=args.top_k))
    maybe_snapshot(args, session, result, f"patchscope: {args.prompt[:50]}")
    if args.json:
        print_json(result.summary())
        return 0
    pos = int(result.positions[0])
    print(f"{result.model}: block outputs of position {pos} ({str(result.tokens[pos])!r}) patched into the identity "
          f"prompt's position {result.placeholder}")
    for i, label in enumerate(result.layer_labels):
        tops = ", ".join(f"{str(t)!r} {p:.2f}" for t, p in zip(result.top_tokens[i, 0][:5], result.top_probs[i, 0][:5]))
        print(f"{label:>6}  {tops}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("probe", help="logistic-regression probes at every layer (held-out accuracy, control)",
                       description="Per-layer linear probes on labelled texts: k-fold held-out accuracy ± SE, "
                                   "a shuffled-label control and the chance line.")
    add_model_args(p)
    p.add_argument("--data", required=True,
                   help="JSONL or CSV with text and label (optional group), or a built-in set: "
                        "facts, gender, city_animal")
    p.add_argument("--site", default="last", choices=["last", "mean"], help="the last token or the mean over tokens")
    p.add_argument("--folds", type=int, default=5, help="k of the stratified k-fold (default 5)")
    p.add_argument("--C", type=float, default=1.0, help="inverse L2 strength, as scikit-learn's C (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds and the shuffled control")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")
    p.add_argument("--save-vector", metavar="FILE", default=None,
                   help="save the best row's direction as a steering vector (.safetensors)")
    p.add_argument("--save-probe", metavar="FILE", default=None, help="save the best row's probe (.safetensors)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_snapshot_arg(p)
    p.set_defaults(fn=cmd_probe)

    p = sub.add_parser("ccs", help="contrast-consistent search (Burns et al.) at every layer",
                       description="Unsupervised truth directions on contrast pairs, per layer, beside a "
                                   "supervised probe and the logit lens's answer.")
    add_model_args(p)
    p.add_argument("--data", required=True,
                   help='JSONL of {"pos", "neg", "label"} lines (label 1 when pos is true), or the built-in facts')
    p.add_argument("--site", default="last", choices=["last", "mean"], help="where hidden states are read")
    p.add_argument("--train-fraction", type=float, default=0.6, help="share of pairs to train on (default 0.6)")
    p.add_argument("--restarts", type=int, default=10, help="random starts per layer (default 10)")
    p.add_argument("--epochs", type=int, default=1000, help="full-batch AdamW steps (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the starts")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_snapshot_arg(p)
    p.set_defaults(fn=cmd_ccs)

    p = sub.add_parser("patchscope", help="decode block outputs by patching them into an identity prompt",
                       description="For every block l: block l's output of the prompt at one position replaces "
                                   "block l's output at the identity prompt's last token; the identity prompt's "
                                   "next-token top-k is printed.")
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the source prompt")
    p.add_argument("--position", type=int, default=-1, help="source position (negative counts from the end)")
    p.add_argument("--identity", default=None,
                   help="identity prompt (\\n for newlines); default 'cat -> cat\\n1135 -> 1135\\nhello -> hello\\n?'")
    p.add_argument("--placeholder", type=int, default=-1,
                   help="identity prompt position that is replaced (default -1, its last token; e.g. -2 with an "
                        "identity prompt ending in '? ->', whose next token is then the repeated one)")
    p.add_argument("--top-k", type=int, default=10, help="tokens per row (default 10)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_snapshot_arg(p)
    p.set_defaults(fn=cmd_patchscope)
