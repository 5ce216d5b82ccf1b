"""``python -m explorer sae``: train a TopK or BatchTopK sparse autoencoder (or a transcoder) on one site;
encode a prompt with an SAE; index, show, search and compare its features (``cli.sae_browse``)."""
from __future__ import annotations

import sys
from pathlib import Path

from cli import checks
from cli.common import add_json_arg, add_model_args, load_session, log, print_json
from cli.sae_browse import add_browse_commands
from explorer.core.errors import ExplorerError


def add_commands(sub) -> None:
    p = sub.add_parser("sae", help="sparse autoencoders: train one here, encode a prompt with one",
                       description="Train a TopK sparse autoencoder on a block's residual output or MLP output "
                                   "(saved in the SAELens layout), or list a prompt's top SAE features.")
    ssub = p.add_subparsers(dest="sae_command", required=True, metavar="ACTION",
                            help="train, encode, attribute, feature, vector, index, show, search, explain or compare")

    q = ssub.add_parser("train", help="train (or resume) a TopK or BatchTopK SAE, or a transcoder, on one site",
                        description="Stream a corpus through the model (stopped after the chosen layer) and "
                                    "train a TopK SAE on the site's activations; an interrupted run resumes from "
                                    "its last checkpoint in --out. Prints FVU, L0, dead-latent share and "
                                    "Δ LM loss on held-out windows.")
    add_model_args(q)
    q.add_argument("--layer", type=checks.non_negative_int, required=True, help="the block (from 0)")
    q.add_argument("--site", choices=["resid", "mlp_out", "transcoder"], default="resid",
                   help="resid: the block's output (residual stream); mlp_out: its MLP's output; transcoder: "
                        "from the MLP's input (after its norm) to its output (Δ loss replaces the MLP's output)")
    q.add_argument("--architecture", choices=["topk", "batchtopk"], default="topk",
                   help="topk: k latents per token; batchtopk: the k·B largest across each batch of B tokens, "
                        "saved as a JumpReLU with the threshold estimated in training (SAELens's layout)")
    q.add_argument("--width", type=checks.positive_int, default=4608, help="latents (SAE width)")
    q.add_argument("--k", type=checks.positive_int, default=32, help="active latents per token (TopK)")
    q.add_argument("--max-tokens", type=checks.positive_int, default=2_000_000, help="training tokens")
    q.add_argument("--corpus", default=None, type=corpus_arg, metavar="PATH|large",
                   help="text (one document per line), JSONL, parquet or a saved datasets directory; 'large' "
                        "fetches State of the Union + Moby-Dick (~2.5M tokens) once; default: the news corpus")
    q.add_argument("--format", default="auto", choices=["auto", "text", "jsonl", "parquet", "datasets"],
                   help="the corpus format (auto: from the file name)")
    q.add_argument("--text-field", default="text", help="JSONL/parquet/datasets field holding the text")
    q.add_argument("--lr", type=checks.positive_float, default=None,
                   help="Adam learning rate (default: 5e-4 / sqrt(width / 16384))")
    q.add_argument("--batch", type=checks.positive_int, default=1024, help="activation vectors per optimizer step")
    q.add_argument("--window", type=checks.int_between(2, 1_000_000), default=128, help="tokens per window")
    q.add_argument("--batch-windows", type=checks.positive_int, default=32, help="windows per forward pass")
    q.add_argument("--eval-every", type=checks.positive_int, default=20,
                   help="forward passes between evaluations (Δ loss on the held-out windows)")
    q.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the shuffling")
    q.add_argument("--out", required=True, metavar="DIR",
                   help="output directory: cfg.json + sae_weights.safetensors (SAELens layout), training.json")
    add_json_arg(q, '{"fvu", "l0", "dead_fraction", "delta_loss", "tokens"}')
    q.set_defaults(fn=cmd_train)

    q = ssub.add_parser("encode", help="a prompt's top SAE features at every position",
                        description="Encode a prompt with an SAE in the SAELens layout (a directory, or a hub id "
                                    "already in the local cache), exactly as its cfg.json architecture defines.")
    add_model_args(q)
    q.add_argument("--sae", required=True, metavar="DIR",
                   help="the SAE's directory (cfg.json + sae_weights.safetensors)")
    q.add_argument("--prompt", required=True, type=checks.text, help="the text to encode")
    q.add_argument("--top-k", type=checks.positive_int, default=10, help="features listed per position")
    q.add_argument("--any-model", action="store_true",
                   help="use the SAE even if it names another model (widths must still match)")
    add_json_arg(q, '{"tokens", "features": [[{"feature", "activation"}, ...], ...]}')
    q.set_defaults(fn=cmd_encode)
    add_attribute_command(ssub)

    q = ssub.add_parser("feature", help="a feature's card: the output tokens its decoder direction promotes",
                        description="The tokens whose logits a feature's decoder direction raises and lowers most "
                                    "(W_U · W_dec[feature], through the final norm's gain), a direct-effect view.")
    add_model_args(q)
    q.add_argument("--sae", required=True, metavar="DIR",
                   help="the SAE's directory (cfg.json + sae_weights.safetensors)")
    q.add_argument("--feature", type=checks.non_negative_int, required=True, help="the feature's number (from 0)")
    q.add_argument("--top-k", type=checks.positive_int, default=10, help="tokens listed each way")
    q.add_argument("--any-model", action="store_true",
                   help="use the SAE even if it names another model (widths must still match)")
    add_json_arg(q, "the card")
    q.set_defaults(fn=cmd_feature)

    q = ssub.add_parser("vector", help="a feature's decoder direction as a steering vector file",
                        description="Write feature F's decoder row, normalised to length 1, as a steering vector "
                                    "(method sae-feature, at the SAE's layer) for `generate --steer`, "
                                    "`steer apply|sweep` and the Steering tab. No model is loaded.")
    q.add_argument("--sae", required=True, metavar="DIR",
                   help="the SAE's directory (cfg.json + sae_weights.safetensors)")
    q.add_argument("--feature", type=checks.non_negative_int, required=True, help="the feature's number (from 0)")
    q.add_argument("--out", required=True, metavar="VEC.safetensors", help="where to write the vector")
    add_json_arg(q, '{"out", "layer", "feature", "method"}')
    q.set_defaults(fn=cmd_vector)
    add_browse_commands(ssub)


def cmd_vector(args) -> int:
    from explorer.features.edits import feature_vector
    from explorer.features.saelens_io import load_sae
    from explorer.interventions.steering import save_vector

    vec = feature_vector(load_sae(args.sae), args.feature)
    path = save_vector(vec, args.out)
    if args.json:
        print_json({"out": str(path), "layer": vec.layer, "feature": args.feature, "method": vec.method})
    else:
        log(f"feature {args.feature}'s decoder direction (layer {vec.layer}) written to {path}")
    return 0


def add_attribute_command(ssub) -> None:
    q = ssub.add_parser("attribute", help="attribute a target logit to SAE features (activation × gradient)",
                        description="Splice the SAE (with its error term) into the model and attribute the target "
                                    "token's logit at the last position to each feature at each position: "
                                    "activation × gradient, ranked by the total over positions.")
    add_model_args(q)
    q.add_argument("--sae", required=True, metavar="DIR",
                   help="the SAE's directory (cfg.json + sae_weights.safetensors)")
    q.add_argument("--prompt", required=True, type=checks.text, help="the text")
    q.add_argument("--target", default=None, type=checks.token,
                   help="the target token, e.g. ' Paris' (default: the model's top-1 at the last position)")
    q.add_argument("--top-n", type=checks.positive_int, default=20, help="features listed")
    q.add_argument("--any-model", action="store_true",
                   help="use the SAE even if it names another model (widths must still match)")
    add_json_arg(q, '{"target", "logit", "features": [{"feature", "attribution", "per_position"}, ...]}')
    q.set_defaults(fn=cmd_attribute)


def cmd_attribute(args) -> int:
    import numpy as np

    from explorer.features.attribution import feature_attribution
    from explorer.features.saelens_io import load_sae

    sae = load_sae(args.sae)
    if sae.cfg.site is None:
        raise ExplorerError(f"{args.sae}: cfg.json names no hook (metadata.hook_name)")
    session = load_session(args)
    r = feature_attribution(session, args.prompt, sae=args.sae, target=args.target, top_n=args.top_n,
                            any_model=args.any_model)
    rows = [{"feature": int(f), "attribution": float(t), "per_position": [float(v) for v in r.per_position[:, i]]}
            for i, (f, t) in enumerate(zip(r.features, r.totals))]
    if args.json:
        print_json({"tokens": [str(t) for t in r.tokens], "target": r.target, "logit": r.logit,
                    "layer": r.layer, "site": r.site, "features": rows})
        return 0
    print(f"logit of {r.target!r} = {r.logit:.3f}; layer {r.layer} {r.site} features by activation × gradient:")
    for row in rows:
        peak = int(np.argmax(np.abs(row["per_position"])))
        print(f"  {row['feature']:>7d}  {row['attribution']:+9.4f}  (most at {peak}: {str(r.tokens[peak])!r})")
    return 0


def cmd_feature(args) -> int:
    from explorer.features.card import feature_card
    from explorer.features.saelens_io import load_sae

    sae = load_sae(args.sae)
    if args.feature >= sae.d_sae:
        raise ExplorerError(f"--feature {args.feature} is out of range: the SAE has features 0..{sae.d_sae - 1}")
    session = load_session(args)
    card = feature_card(session, args.sae, args.feature, top_k=args.top_k, any_model=args.any_model)
    if args.json:
        print_json({k: v for k, v in card.to_dict().items() if k != "type"})
        return 0
    print(f"feature {card.feature} (layer {card.layer} {card.site}) promotes: "
          + ", ".join(f"{t!r} {v:+.2f}" for t, v in zip(card.top_tokens, card.top_values)))
    print("  suppresses: " + ", ".join(f"{t!r} {v:+.2f}" for t, v in zip(card.bottom_tokens, card.bottom_values)))
    return 0


def corpus_arg(value: str) -> str:
    """A corpus path that exists, or ``large``."""
    from explorer.features.corpora import LARGE_CORPUS_NAME

    return value if value == LARGE_CORPUS_NAME else checks.existing("corpus")(value)


def _check_sizes(args) -> None:
    """Layer and k against the model's config.json and width, before the model loads."""
    from explorer.core.session import read_config

    if args.k > args.width:
        raise ExplorerError(f"--k {args.k} is more than --width {args.width}")
    config = read_config(args.model)
    n_layers = config.get("num_hidden_layers", config.get("n_layer"))
    if isinstance(n_layers, int) and args.layer >= n_layers:
        raise ExplorerError(f"--layer {args.layer} does not exist: the model has layers 0..{n_layers - 1}")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ExplorerError(f"--out {args.out} is a file; give a directory")


def cmd_train(args) -> int:
    from tqdm import tqdm

    from explorer.core.jobs import Job
    from explorer.features.train import TrainConfig, train_sae

    _check_sizes(args)
    config = TrainConfig(layer=args.layer, site=args.site, architecture=args.architecture, width=args.width, k=args.k,
                         max_tokens=args.max_tokens,
                         lr=args.lr, batch=args.batch, window=args.window, batch_windows=args.batch_windows,
                         eval_every=args.eval_every, corpus_path=args.corpus, corpus_format=args.format,
                         text_field=args.text_field, seed=args.seed)
    config.check()
    session = load_session(args)
    bar = tqdm(total=args.max_tokens, unit="tok", unit_scale=True, desc="training", file=sys.stderr,
               dynamic_ncols=True)

    def on_progress(progress, partial) -> None:
        bar.total, bar.n = progress.total, progress.done
        fvu = partial.log_fvu[-1] if partial is not None and len(partial.log_fvu) else float("nan")
        bar.set_postfix_str(f"{progress.message}, train FVU {fvu:.3f}", refresh=False)
        bar.refresh()

    try:
        result = Job(lambda ctx: train_sae(session, config, ctx=ctx, out_dir=args.out), name="sae-train",
                     on_progress=on_progress).run()
    finally:
        bar.close()
    if result.status == "done" and result.tokens < args.max_tokens:
        log(f"note: the corpus ended after {result.tokens:,} training tokens (of --max-tokens {args.max_tokens:,}); "
            "--corpus large has ~2.5M")
    if args.json:
        print_json(result.summary())
        return 0
    log(f"saved to {result.out_dir}")
    arch = result.settings.get("architecture", "topk")
    print(f"{result.status}: {result.tokens:,} tokens, layer {result.layer} {result.site}, {arch}, "
          f"width {result.width}, k {result.k}; FVU {result.fvu:.4f}, L0 {result.l0:.1f}, "
          f"dead {result.dead_fraction:.1%}, "
          f"Δ loss {result.delta_loss:+.4f} nats (clean {result.clean_loss:.4f}) in {result.elapsed_s:.0f} s")
    return 0


def cmd_encode(args) -> int:
    from explorer.features.encode import encode_prompt
    from explorer.features.saelens_io import load_sae

    sae = load_sae(args.sae)          # a bad SAE directory fails before the model loads
    if sae.cfg.site is None:
        raise ExplorerError(f"{args.sae}: cfg.json names no hook (metadata.hook_name)")
    session = load_session(args)
    result = encode_prompt(session, args.prompt, sae=args.sae, top_k=args.top_k, any_model=args.any_model)
    features = result.per_position()
    if args.json:
        print_json({"tokens": [str(t) for t in result.tokens], "features": features,
                    "layer": result.layer, "site": result.site, "l0": result.l0.tolist()})
        return 0
    print(f"{args.sae}: layer {result.layer} {result.site}, {result.d_sae} features ({result.architecture})")
    for token, feats in zip(result.tokens, features):
        listed = ", ".join(f"{f['feature']} ({f['activation']:.3g})" for f in feats) or "—"
        print(f"  {str(token)!r:>16}  {listed}")
    return 0
