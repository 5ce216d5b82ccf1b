"""CLI commands ``generate`` (text, optionally with an intervention) and ``steer build|apply|sweep|compare``."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from cli import checks
from cli.common import add_json_arg, add_model_args, add_snapshot_arg, load_session, log, maybe_snapshot, print_json
from explorer.core.errors import ExplorerError

MAX_NEW_TOKENS = 1024


def _unit_float(text: str) -> float:
    value = checks.positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _alphas(text: str) -> tuple[float, ...]:
    from explorer.interventions.steering import parse_alphas

    try:
        return parse_alphas(text)
    except ExplorerError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_vector_args(p, required: bool) -> None:
    p.add_argument("--vector", required=required, metavar="VEC", type=checks.existing("steering vector", "file"),
                   help="a steering vector file (.safetensors, tensor 'vector' [d_model]) from `steer build`")
    p.add_argument("--layer", type=checks.non_negative_int, default=None,
                   help="the block whose output the vector is added to (default: the layer it was built at)")


def add_commands(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate text (KV cache; greedy unless --temperature), optionally steered or ablated",
        description="Generate text after a prompt, greedy unless --temperature is given. With --steer (a "
                    "steering vector) and/or --ablate (components) the generation runs with that intervention; "
                    "--ab also runs the plain arm with the same seed and prints both.")
    add_model_args(p)
    p.add_argument("--prompt", required=True, type=checks.text, help="the text to continue")
    p.add_argument("--max-new-tokens", type=checks.int_between(1, MAX_NEW_TOKENS), default=32,
                   help=f"tokens to generate at most (1-{MAX_NEW_TOKENS}; default 32)")
    p.add_argument("--temperature", type=checks.non_negative_float, default=None,
                   help="sampling temperature (default: greedy decoding; 0 is greedy too)")
    p.add_argument("--top-p", type=_unit_float, default=1.0,
                   help="nucleus sampling: keep the top tokens up to this mass")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler (both arms use the same)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears in the output (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template (instruct models)")
    p.add_argument("--steer", metavar="FILE", default=None, type=checks.existing("steering vector", "file"),
                   help="add --alpha times this steering vector (.safetensors) to block --layer's output")
    p.add_argument("--layer", type=checks.non_negative_int, default=None,
                   help="the block steered (default: the layer the vector was built at)")
    p.add_argument("--alpha", type=_finite, default=1.0, help="the steering coefficient (default 1)")
    p.add_argument("--positions", choices=["all", "last", "generated"], default="all",
                   help="where the vector is added: every position, the prompt's last token, or generated tokens")
    p.add_argument("--ablate", default=None, metavar="SPECS", type=checks.component_specs,
                   help="components ablated while generating: L.H, L:N, attn:L, mlp:L, block:L (comma-separated)")
    p.add_argument("--ablate-mode", choices=["zero", "mean"], default="zero", help="the ablation's replacement")
    p.add_argument("--ablate-direction", metavar="FILE", default=None,
                   type=checks.existing("direction file", "file"),
                   help="project this vector's direction out of every layer (directional ablation)")
    p.add_argument("--sae", metavar="DIR", default=None,
                   help="an SAE folder (SAELens layout: cfg.json + sae_weights.safetensors), for --features")
    p.add_argument("--features", metavar="SPECS", default=None, type=checks.feature_specs,
                   help="SAE features edited while generating, error term kept: a number ablates, F=V clamps "
                        "(e.g. '123, 456=5.0'); needs --sae")
    p.add_argument("--ab", action="store_true", help="also generate without the intervention (same seed)")
    p.add_argument("--lens", action="store_true",
                   help="with --json: each token's logit-lens column and its rank per layer")
    add_json_arg(p, '{"text", "tokens", "token_ids"}')
    add_snapshot_arg(p)
    p.set_defaults(fn=cmd_generate)

    steer = sub.add_parser("steer", help="steering vectors: build from contrastive prompts, apply, sweep α",
                           description="Build a steering vector from two prompt lists, add it to the residual "
                                       "stream and read the effect on a target token, or sweep its coefficient.")
    ssub = steer.add_subparsers(dest="steer_command", required=True, metavar="ACTION",
                                help="build, apply or sweep (each has its own --help)")

    p = ssub.add_parser("build", help="build a vector at a layer from positive and negative prompts",
                        description="Read block --layer's output at each prompt's last token; the vector is the "
                                    "mean over pairs of (positive - negative) (--method mean), the first principal "
                                    "component of the differences (pca) or a logistic-regression direction "
                                    "(logreg). Files: one prompt per line (or JSONL with a 'text' field).")
    add_model_args(p)
    p.add_argument("--pos", required=True, metavar="FILE", type=checks.existing("--pos file", "file"),
                   help="positive prompts, one per line")
    p.add_argument("--neg", required=True, metavar="FILE", type=checks.existing("--neg file", "file"),
                   help="negative prompts, one per line (as many as --pos for mean and pca)")
    p.add_argument("--layer", required=True, type=checks.non_negative_int, help="the block whose output is read")
    p.add_argument("--method", choices=["mean", "pca", "logreg"], default="mean", help="how the vector is made")
    p.add_argument("--out", required=True, metavar="VEC.safetensors", help="where to write the vector")
    add_json_arg(p, "the vector's description")
    add_snapshot_arg(p)
    p.set_defaults(fn=cmd_build)

    p = ssub.add_parser("apply", help="the target token's logit, probability and rank with and without steering",
                        description="Add --alpha times the vector to block --layer's output at every position "
                                    "(or --positions last) and report the target at the last position.")
    add_model_args(p)
    _add_vector_args(p, required=True)
    p.add_argument("--alpha", type=_finite, default=1.0, help="the steering coefficient (default 1)")
    p.add_argument("--prompt", required=True, type=checks.text, help="the text to run")
    p.add_argument("--target", required=True, type=checks.token, help="target token, e.g. ' Paris' or '#1234'")
    p.add_argument("--compare", default=None, metavar="TOKEN", type=checks.token,
                   help="also report the target minus this token's logit")
    p.add_argument("--positions", choices=["all", "last"], default="all", help="where the vector is added")
    p.add_argument("--ablate-direction", action="store_true",
                   help="project the vector's direction out of every layer instead of adding it")
    add_json_arg(p, '{"baseline": {"logit", "prob", "rank"}, "steered": {...}}')
    add_snapshot_arg(p)
    p.set_defaults(fn=cmd_apply)

    p = ssub.add_parser("sweep", help="the target's logit (difference) against the steering coefficient",
                        description="For each α, add α times the vector to block --layer's output and read the "
                                    "metric at the last position: the target's logit, minus --compare's when given.")
    add_model_args(p)
    _add_vector_args(p, required=True)
    p.add_argument("--alphas", type=_alphas, default=(-8.0, -4.0, 0.0, 4.0, 8.0), help="e.g. -8,-4,0,4,8")
    p.add_argument("--prompt", required=True, type=checks.text, help="the text to run")
    p.add_argument("--target", required=True, type=checks.token, help="target token, e.g. ' Paris' or '#1234'")
    p.add_argument("--compare", default=None, metavar="TOKEN", type=checks.token,
                   help="metric = target logit minus this token's logit")
    p.add_argument("--positions", choices=["all", "last"], default="all", help="where the vector is added")
    p.add_argument("--text-alphas", type=_alphas, default=(), help="also generate greedily at these α (e.g. -8,8)")
    p.add_argument("--max-new-tokens", type=checks.int_between(1, 256), default=16,
                   help="tokens generated per --text-alphas value")
    add_json_arg(p)
    add_snapshot_arg(p)
    p.set_defaults(fn=cmd_sweep)

    p = ssub.add_parser("compare", help="bias probes under steering and direction ablation beside a pronoun-swap run",
                        description="Score the pronoun-swap run's bias probes (pronoun preference, stereotype "
                                    "alignment, minimal pairs, with SEs) and held-out loss under steering at each "
                                    "--alphas value and with the direction ablated, on the run's own probe set and "
                                    "held-out windows, beside the run's control and swapped arms at their last "
                                    "evaluation. The direction is the gender direction of the swap's word pairs "
                                    "unless --vector is given.")
    add_model_args(p)
    p.add_argument("--run", default=None, metavar="DIR", type=checks.existing("swap run folder", "dir"),
                   help="a pronoun-swap run folder (from `intervene --out DIR`); without it, the default run "
                        "settings' probe set and windows, and no swap rows")
    p.add_argument("--vector", default=None, metavar="VEC", type=checks.existing("steering vector", "file"),
                   help="steer with this vector instead of the gender direction of the swap's word pairs")
    p.add_argument("--layer", default=None, type=checks.non_negative_int,
                   help="the block steered (default: the vector's layer, or a third of the depth)")
    p.add_argument("--alphas", type=_alphas, default=(-2.0, -1.0, 0.0, 1.0, 2.0), help="e.g. -2,-1,0,1,2")
    p.add_argument("--no-ablate", action="store_true", help="leave out the direction-ablation row")
    p.add_argument("--max-templates", type=checks.positive_int, default=None,
                   help="score only the first N of the run's templates (a quick look; not the run's probe set)")
    p.add_argument("--max-pairs", type=checks.positive_int, default=None, help="only the first N minimal pairs")
    p.add_argument("--max-windows", type=checks.positive_int, default=None, help="only the first N held-out windows")
    add_json_arg(p, '{"model", "run", "layer", "rows": [{"label", "kind", "alpha", "step", '
                    '"pronoun_preference": {"value", "se"}, ...}], ...}')
    add_snapshot_arg(p)
    p.set_defaults(fn=cmd_compare)


# ============================================================================ checks
def _geometry(args):
    return checks.model_geometry(args.model)


def _check_layer(args, layer: int | None) -> None:
    geom = _geometry(args)
    if layer is not None and geom is not None and layer >= geom.n_layers:
        raise ExplorerError(f"--layer {layer} does not exist: the model has {geom.n_layers} layers "
                            f"(0-{geom.n_layers - 1})")


def _vector(args, path: str):
    """Read a vector file and check it against the model's config, before the model loads."""
    from explorer.core.session import resolve_model
    from explorer.interventions.steering import SteeringError, load_vector

    vec = load_vector(path)
    geom = _geometry(args)
    if geom is not None and vec.d_model != geom.d_model:
        raise SteeringError(f"{path} has {vec.d_model} values but the model's residual stream has "
                            f"{geom.d_model}: it was built for another model ({vec.model or 'unknown'})")
    name = resolve_model(args.model)[0]
    # A vector with a weights fingerprint is checked against the loaded weights (SteeringVector.check_for);
    # an older one by the model's name, here, before the model loads.
    if not vec.fingerprint and vec.model and vec.model != name:
        raise SteeringError(f"{path} was built on {vec.model!r}, not on {name!r}: build it again on this model")
    layer = getattr(args, "layer", None)
    if layer is None and vec.layer < 0 and getattr(args, "steer", None) is not None:
        raise ExplorerError(f"{path} does not say which layer it was built at: give --layer")
    _check_layer(args, layer if layer is not None else (vec.layer if vec.layer >= 0 else None))
    return vec


def read_prompts(path: str) -> tuple[str, ...]:
    """Prompts from a file: one per line, or JSONL rows (a string or an object with 'text')."""
    from explorer.interventions.steering import check_prompts

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ExplorerError(f"cannot read {path}: {e}") from None
    if path.endswith((".jsonl", ".json")):
        out = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise ExplorerError(f"{path} line {i} is not JSON") from None
            text = row.get("text") if isinstance(row, dict) else row
            if not isinstance(text, str):
                raise ExplorerError(f"{path} line {i} has no 'text' string")
            out.append(text)
        lines = out
    return check_prompts(lines, path)


# ========================================================================== commands
def cmd_generate(args) -> int:
    from explorer.interventions.generate import GenerateRequest, Intervention, generate

    if args.layer is not None and args.steer is None:
        raise ExplorerError("--layer needs --steer FILE (the vector to add)")
    if args.ablate:
        checks.check_components(args.model, [args.ablate])
    if args.features and not args.sae:
        raise ExplorerError("--features needs --sae DIR (the SAE the feature numbers belong to)")
    if args.sae and not args.features:
        raise ExplorerError("--sae is used with --features (which features to ablate or clamp)")
    if args.sae:
        from explorer.features.saelens_io import resolve_sae_dir

        resolve_sae_dir(args.sae)   # a missing folder fails before the model loads
    steer = _vector(args, args.steer) if args.steer else None
    direction = _vector(args, args.ablate_direction) if args.ablate_direction else None
    intervention = None
    if steer is not None or direction is not None or args.ablate or args.features:
        intervention = Intervention(
            components=args.ablate or (),
            mode=args.ablate_mode,
            steer=None if steer is None else tuple(steer.vector.tolist()),
            layer=None if steer is None else (args.layer if args.layer is not None else steer.layer),
            alpha=args.alpha, positions=args.positions,
            direction=None if direction is None else tuple(direction.vector.tolist()),
            label=Path(args.steer).name if args.steer else "",
            sae=args.sae or "", features=args.features or "")
    if args.ab and intervention is None:
        raise ExplorerError("--ab compares with an intervention: give --steer, --ablate, --ablate-direction "
                            "or --features")
    request = GenerateRequest(args.prompt, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature or 0.0, top_p=args.top_p, seed=args.seed,
                              stop=tuple(args.stop), chat=args.chat, intervention=intervention,
                              compare=args.ab, lens=args.lens)
    session = load_session(args)
    for vec in (steer, direction):
        if vec is not None:
            vec.check_for(session)   # the weights fingerprint, now that the weights are here
    streaming = not args.json and not args.ab

    def on_token(step, pieces):
        if streaming and pieces[-1]:
            print(pieces[-1], end="", flush=True)

    result = generate(session, request, on_token=on_token)
    maybe_snapshot(args, session, result, f"generate: {args.prompt[:50]}")
    main = result.main
    if args.json:
        data = {"text": main.text, "tokens": [str(t) for t in main.tokens],
                "token_ids": [int(i) for i in main.token_ids], "stop_reason": main.stop_reason}
        if args.ab:
            b = result.baseline
            data["baseline"] = {"text": b.text, "tokens": [str(t) for t in b.tokens],
                                "token_ids": [int(i) for i in b.token_ids]}
        if args.lens:
            data["lens"] = {a.label: {"chosen_ranks": a.chosen_ranks.tolist(),
                                      "top_tokens": a.top_tokens[..., 0].tolist()} for a in result.arms}
            data["layer_labels"] = list(result.layer_labels)
        print_json(data)
        return 0
    if streaming:
        print()
    else:
        for arm in result.arms:
            print(f"--- {arm.label}")
            print(arm.text)
    log(f"{len(main.token_ids)} tokens in {result.seconds:.2f} s ({main.stop_reason})")
    return 0


def cmd_build(args) -> int:
    from explorer.interventions.steering import BuildRequest, build_vector, save_vector

    pos, neg = read_prompts(args.pos), read_prompts(args.neg)
    if args.method in ("mean", "pca") and len(pos) != len(neg):
        raise ExplorerError(f"--pos has {len(pos)} prompts and --neg {len(neg)}: {args.method} pairs them "
                            f"line by line, so give as many of each (or use --method logreg)")
    _check_layer(args, args.layer)
    session = load_session(args)
    vec = build_vector(session, BuildRequest(pos, neg, args.layer, args.method))
    path = save_vector(vec, args.out)
    maybe_snapshot(args, session, vec, f"steering vector L{vec.layer} ({vec.method})")
    info = {"out": str(path), "model": vec.model, "layer": vec.layer, "method": vec.method, "norm": vec.norm,
            "d_model": vec.d_model, "positive_tokens": list(vec.positive_tokens),
            "negative_tokens": list(vec.negative_tokens)}
    if args.json:
        print_json(info)
    else:
        print(f"wrote {path}: layer {vec.layer}, {vec.method}, norm {vec.norm:.3f}, from {len(pos)}+{len(neg)} prompts")
        print("read at tokens: " + ", ".join(repr(t) for t in vec.positive_tokens + vec.negative_tokens))
    return 0


def _stats(s) -> dict:
    out = {"logit": s.logit, "prob": s.prob, "rank": s.rank}
    if s.logit_diff is not None:
        out["logit_diff"] = s.logit_diff
    return out


def cmd_apply(args) -> int:
    from explorer.interventions.steering import SteerRequest, steer_apply

    vec = _vector(args, args.vector)
    session = load_session(args)
    request = SteerRequest(args.prompt, args.target, vec, layer=args.layer, alpha=args.alpha,
                           positions=args.positions, mode="ablate" if args.ablate_direction else "add",
                           compare_token=args.compare)
    result = steer_apply(session, request)
    maybe_snapshot(args, session, result, f"steer L{result.layer} α={args.alpha:g}: {args.prompt[:40]}")
    if args.json:
        print_json({"baseline": _stats(result.baseline), "steered": _stats(result.steered),
                    "layer": result.layer, "alpha": args.alpha, "target": result.target})
        return 0
    what = "direction ablated" if args.ablate_direction else f"α = {args.alpha:g} at layer {result.layer}"
    print(f"target {result.target!r} at the last position, {what}")
    for name, s in (("baseline", result.baseline), ("steered", result.steered)):
        diff = "" if s.logit_diff is None else f"  logit − {result.compare!r}: {s.logit_diff:8.3f}"
        print(f"{name:>9}: logit {s.logit:8.3f}  prob {s.prob:9.4g}  rank {s.rank:6d}{diff}")
    return 0


def cmd_sweep(args) -> int:
    from explorer.interventions.steering import SteerSweepRequest, steer_sweep

    vec = _vector(args, args.vector)
    session = load_session(args)
    request = SteerSweepRequest(args.prompt, args.target, vec, alphas=args.alphas, layer=args.layer,
                                positions=args.positions, compare_token=args.compare,
                                text_alphas=args.text_alphas, max_new_tokens=args.max_new_tokens)
    result = steer_sweep(session, request)
    maybe_snapshot(args, session, result, f"steer sweep L{result.layer}: {args.prompt[:40]}")
    if args.json:
        data = result.to_dict()
        data.pop("request")
        data["vector"] = {"model": vec.model, "layer": vec.layer, "method": vec.method, "norm": vec.norm}
        print_json(data)
        return 0
    what = f"logit({result.target!r})" + ("" if result.compare is None else f" − logit({result.compare!r})")
    print(f"{what} against α at layer {result.layer} (baseline {result.baseline_metric:.3f})")
    for a, m, p, r in zip(result.alphas, result.metric, result.probs, result.ranks):
        print(f"α {a:8.3g}: {m:8.3f}  prob {p:9.4g}  rank {r:6d}")
    for a, text in zip(result.text_alphas, result.texts):
        print(f"α {a:g}: {text!r}")
    return 0


def compare_json(result) -> dict:
    """The comparison as the ``steer compare --json`` object."""
    return {"model": result.model, "run": result.run, "run_model": result.run_model, "layer": result.layer,
            "vector_norm": result.vector_norm, "same_probes": result.same_probes, "note": result.note,
            "probe_set": {"templates": result.n_templates, "occupations": result.n_occupations,
                          "pairs": result.n_pairs, "windows": result.n_windows, "seq_len": result.seq_len},
            "rows": result.table()}


def cmd_compare(args) -> int:
    from explorer.training.steer_compare import METRICS, SteerCompareRequest, steering_vs_swap

    vec = _vector(args, args.vector) if args.vector else None
    _check_layer(args, args.layer)
    session = load_session(args)
    request = SteerCompareRequest(run=args.run or "", layer=args.layer, alphas=args.alphas,
                                  ablate=not args.no_ablate, vector=vec, max_templates=args.max_templates,
                                  max_pairs=args.max_pairs, max_windows=args.max_windows)
    result = steering_vs_swap(session, request)
    maybe_snapshot(args, session, result, f"steering vs swap L{result.layer}")
    if args.json:
        print_json(compare_json(result))
        return 0
    print(f"layer {result.layer}, vector norm {result.vector_norm:.2f}; {result.n_templates} templates x "
          f"{result.n_occupations} occupations, {result.n_pairs} pairs, {result.n_windows} windows of "
          f"{result.seq_len} tokens" + (f"; run {result.run}" if result.run else ""))
    if result.note:
        print(f"note: {result.note}")
    print(f"{'':>24}" + "".join(f"{m:>24}" for m in METRICS))
    for i, label in enumerate(result.labels):
        cells = []
        for m in METRICS:
            v, se = result.value(m, i)
            cells.append(f"{v:>14.3f} ± {se:<7.3f}")
        print(f"{label:>24}" + "".join(cells))
    return 0
