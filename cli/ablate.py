"""CLI commands ``ablate`` (single ablations and sweeps) and ``patch`` (activation patching)."""
from __future__ import annotations

import sys

import numpy as np

from cli import checks
from cli.common import add_json_arg, add_model_args, add_snapshot_arg, load_session, maybe_snapshot, print_json
from explorer.core.errors import ExplorerError


def add_commands(sub) -> None:
    p = sub.add_parser(
        "ablate", help="ablate heads, neurons or blocks (or sweep every one) and show the effect on a target",
        description="Ablate components and report the target token's logit, probability and rank at the "
                    "last position, before and after. Components: L.H (head), L:N (neuron), attn:L, mlp:L, "
                    "block:L. With --sweep, ablate every head / every block's attention and MLP / the most "
                    "active neurons one at a time.")
    add_model_args(p)
    p.add_argument("--prompt", required=True, type=checks.text, help="the text to run")
    p.add_argument("--target", required=True, type=checks.token, help="target token, e.g. ' Paris' or '#1234'")
    p.add_argument("--heads", default=None, metavar="L.H,...", type=checks.component_specs,
                   help="heads to ablate, e.g. 3.1,5.0")
    p.add_argument("--neurons", default=None, metavar="L:N,...", type=checks.component_specs,
                   help="MLP neurons to ablate, e.g. 5:1024")
    p.add_argument("--blocks", default=None, metavar="attn:L,mlp:L,block:L,...", type=checks.component_specs,
                   help="whole attention/MLP outputs or blocks to ablate")
    p.add_argument("--sae", default=None, metavar="DIR",
                   help="an SAE folder (SAELens layout: cfg.json + sae_weights.safetensors), for --features")
    p.add_argument("--features", default=None, metavar="SPECS", type=checks.feature_specs,
                   help="SAE features ablated (F) or clamped (F=V) together with the components, the SAE's "
                        "error term kept, e.g. '123, 456=5.0'; needs --sae")
    p.add_argument("--sweep", default=None, choices=["heads", "blocks", "neurons", "features"],
                   help="ablate every head / every block's attention and MLP / the --top-n most active neurons "
                        "/ the --top-n most active features of the SAE in --sae (error term kept)")
    p.add_argument("--top-n", type=checks.positive_int, default=50,
                   help="neurons or SAE features swept with --sweep neurons|features")
    p.add_argument("--method", default="exact", choices=["exact", "attribution", "sequential"],
                   help="sweep method: exact (batched, reuses the clean run), attribution (fast "
                        "first-order estimate), sequential (one forward per ablation)")
    p.add_argument("--mode", default="zero", choices=["zero", "mean", "resample"],
                   help="the replacement: zero, the mean activation over a text (--mean-file), or the "
                        "activation on --second-prompt at the same position (resample)")
    p.add_argument("--second-prompt", default=None, type=checks.text,
                   help="resample: prompt (same token length) whose activations replace the ablated ones")
    p.add_argument("--mean-file", default=None, metavar="FILE", type=checks.existing("--mean-file", "file"),
                   help="mean: plain-text file to average activations over (default: the default corpus)")
    p.add_argument("--compare", default=None, metavar="TOKEN", type=checks.token,
                   help="also report the target minus this token's logit (sweeps: the effect on it)")
    p.add_argument("--lens", action="store_true", help="include the logit lens of both runs in --json")
    add_json_arg(p)
    add_snapshot_arg(p)
    p.set_defaults(fn=cmd_ablate)

    p = sub.add_parser(
        "patch", help="activation patching: restore clean activations into a corrupted run, per layer and position",
        description="For each layer and position, write the clean prompt's activation into the corrupted "
                    "prompt's run and report the fraction of the metric gap restored: (patched − corrupt) / "
                    "(clean − corrupt), where the metric is the target's logit at the last position (minus "
                    "--compare's logit when given). Both prompts must have the same number of tokens.")
    add_model_args(p)
    p.add_argument("--clean", required=True, type=checks.text, help="the prompt whose activations are patched in")
    p.add_argument("--corrupt", required=True, type=checks.text,
                   help="the prompt patched into (same number of tokens as --clean)")
    p.add_argument("--target", required=True, type=checks.token, help="target token, e.g. ' Paris' or '#1234'")
    p.add_argument("--compare", default=None, metavar="TOKEN", type=checks.token,
                   help="metric = target logit minus this token's logit")
    p.add_argument("--site", default="resid", choices=["resid", "attn", "mlp", "features"],
                   help="what is patched: the residual stream after each block, each block's attention / MLP "
                        "output, or SAE features (--sae: each feature's clean activation at each position, "
                        "error term kept)")
    p.add_argument("--sae", default=None, metavar="DIR",
                   help="--site features: an SAE folder (SAELens layout: cfg.json + sae_weights.safetensors)")
    p.add_argument("--features", default=None, metavar="F,...", type=checks.feature_specs,
                   help="--site features: the features patched, e.g. '123, 456' (default: the --top-n whose "
                        "activations differ most between the two prompts)")
    p.add_argument("--top-n", type=checks.positive_int, default=20, help="--site features: features patched")
    add_json_arg(p)
    add_snapshot_arg(p)
    p.set_defaults(fn=cmd_patch)


def _run_job(fn, label: str):
    """Run a sweep-like function as a job on this thread, with a tqdm bar on stderr.

    The bar appears with the first progress report, so input errors stay one line.
    """
    from tqdm import tqdm

    from explorer.core.jobs import Job

    bars: list = []

    def on_progress(progress, partial) -> None:
        if not bars:
            bars.append(tqdm(total=progress.total, desc=label, unit="abl", file=sys.stderr, dynamic_ncols=True))
        bar = bars[0]
        if bar.total != progress.total:
            bar.total = progress.total
        bar.update(progress.done - bar.n)

    try:
        return Job(fn, name=label, on_progress=on_progress).run()
    finally:
        for bar in bars:
            bar.close()


def _read_mean_text(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError as e:
        raise ExplorerError(f"cannot read --mean-file {path}: {e.strerror}") from None


def cmd_ablate(args) -> int:
    from explorer.interventions.ablation import AblationRequest, SweepRequest, ablate, sweep

    specs = [s for s in (args.heads, args.neurons, args.blocks) if s]
    if args.sweep == "features":
        from explorer.features.saelens_io import resolve_sae_dir

        if not args.sae or args.features:
            raise ExplorerError("--sweep features needs --sae DIR (the SAE whose features are swept) and no --features")
        if args.mode != "zero" or args.method == "attribution":
            raise ExplorerError("--sweep features ablates each feature to 0: use --mode zero and --method exact "
                                "or sequential")
        resolve_sae_dir(args.sae)   # a missing folder fails before the model loads
    elif bool(args.features) != bool(args.sae):
        raise ExplorerError("--features and --sae go together: the SAE folder and the features to ablate or clamp")
    features = []
    if args.features:
        from explorer.features.edits import parse_features
        from explorer.features.saelens_io import resolve_sae_dir

        resolve_sae_dir(args.sae)   # a missing folder fails before the model loads
        features = [f"sae:{f}={v!r}" for f, v in parse_features(args.features)]
    if args.sweep and (specs or features):
        raise ExplorerError("use either --sweep or components (--heads/--neurons/--blocks/--features), not both")
    if not args.sweep and not (specs or features):
        raise ExplorerError("nothing to ablate: give --heads L.H,..., --neurons L:N,..., --blocks attn:L,..., "
                            "--features with --sae, or --sweep heads|blocks|neurons")
    if args.mode == "resample" and not args.second_prompt:
        raise ExplorerError("--mode resample needs --second-prompt (same token length as --prompt)")
    if specs:
        checks.check_components(args.model, specs)  # layer/head/neuron numbers, from config.json
    mean_text = _read_mean_text(args.mean_file)
    session = load_session(args)
    if args.sweep:
        request = SweepRequest(args.prompt, args.target, kind=args.sweep, mode=args.mode, top_n=args.top_n,
                               method=args.method, second_prompt=args.second_prompt,
                               compare_token=args.compare, mean_text=mean_text,
                               sae=args.sae if args.sweep == "features" else None)
        result = _run_job(lambda ctx: sweep(session, request, ctx=ctx), f"sweep {args.sweep}")
        maybe_snapshot(args, session, result, f"sweep {args.sweep}: {args.prompt[:50]}")
        if args.json:
            print_json(result.to_dict())
        else:
            _print_sweep(result)
        return 0
    request = AblationRequest(args.prompt, args.target, tuple(specs) + tuple(features), mode=args.mode,
                              second_prompt=args.second_prompt, compare_token=args.compare,
                              mean_text=mean_text, lens=args.lens, sae=args.sae)
    result = ablate(session, request)
    maybe_snapshot(args, session, result, f"ablate {','.join(result.components)}: {args.prompt[:50]}")
    if args.json:
        data = result.to_dict()
        data["effect"] = result.effect
        print_json(data)
        return 0
    print(f"ablated ({args.mode}): {', '.join(result.components)}")
    print(f"target {result.target!r} at the last position")
    for name, s in (("baseline", result.baseline), ("ablated", result.ablated)):
        diff = "" if s.logit_diff is None else f"  logit − {result.compare!r}: {s.logit_diff:8.3f}"
        print(f"{name:>9}: logit {s.logit:8.3f}  prob {s.prob:9.4g}  rank {s.rank:6d}{diff}")
    print(f"   effect: {result.effect:+.4f} logit")
    return 0


def _print_sweep(result) -> None:
    kind = result.request.kind
    print(f"{kind} sweep ({result.request.mode}, {result.request.method}): effect on "
          f"{'logit(' + repr(result.target) + ')' if result.compare is None else 'logit diff'}; "
          f"baseline {result.baseline_metric:.3f}")
    e = result.effects
    if kind in ("heads", "blocks"):
        cols = [f"H{h}" for h in range(e.shape[1])] if kind == "heads" else ["attn", "mlp"]
        print("layer " + "".join(f"{c:>8}" for c in cols))
        for l in range(e.shape[0]):
            print(f"{l:>5} " + "".join(f"{v:8.3f}" for v in e[l]))
    print("largest effects: " + ", ".join(f"{c} {v:+.3f}" for c, v in result.top(10)))


def cmd_patch(args) -> int:
    from explorer.interventions.patching import PatchRequest, patch

    if args.site == "features":
        from explorer.features.saelens_io import resolve_sae_dir

        if not args.sae:
            raise ExplorerError("--site features needs --sae DIR (the SAE whose features are patched)")
        resolve_sae_dir(args.sae)   # a missing folder fails before the model loads
    elif args.sae or args.features:
        raise ExplorerError("--sae and --features go with --site features")
    session = load_session(args)
    request = PatchRequest(args.clean, args.corrupt, args.target, site=args.site, compare_token=args.compare,
                           sae=args.sae, features=args.features or "", top_n=args.top_n)
    result = _run_job(lambda ctx: patch(session, request, ctx=ctx), f"patch {args.site}")
    maybe_snapshot(args, session, result, f"patch {args.site}: {args.clean[:40]} | {args.corrupt[:40]}")
    if args.json:
        print_json(result.to_dict())
        return 0
    print(f"restored fraction, site {args.site}: clean metric {result.clean_metric:.3f}, "
          f"corrupt {result.corrupt_metric:.3f}")
    toks = [repr(str(t))[1:-1][:7] for t in result.corrupt_tokens]
    print(("feature" if args.site == "features" else "layer") + " " + "".join(f"{t:>8}" for t in toks))
    for l, label in enumerate(result.layer_labels):
        print(f"{label:>5} " + "".join(f"{v:8.2f}" for v in result.restored[l]))
    best = np.unravel_index(np.nanargmax(result.restored), result.restored.shape)
    print(f"most restoring: {result.layer_labels[best[0]]}, position {best[1]} ({toks[best[1]]!r})")
    return 0
