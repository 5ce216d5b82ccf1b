"""``python -m explorer sae index|show|search|explain|compare``: an SAE's features browsed like neurons.

The feature index is the neuron index with the SAE's latents as its units
(``explorer.features.units``); it lives in ``<SAE directory>/index`` unless ``--index``/``--out``
says otherwise. ``show`` and ``search`` need no model; the JSON of ``show`` is ``neurons show``'s,
with ``feature`` in place of ``neuron``.
"""
from __future__ import annotations

from cli import checks, unit_index
from cli.common import add_json_arg, add_model_args, load_session, log, print_json
from explorer.core.errors import ExplorerError


def _sae_arg(q) -> None:
    q.add_argument("--sae", required=True, metavar="DIR", type=checks.existing("SAE directory", "dir"),
                   help="the SAE's directory (cfg.json + sae_weights.safetensors)")


def _index_args(q, feature: bool = False) -> None:
    """--sae and --index of a command reading the feature index; with ``feature``, --feature too."""
    _sae_arg(q)
    q.add_argument("--index", default=None, metavar="DIR",
                   help="the feature index directory (default: DIR/index inside the SAE's directory)")
    if feature:
        q.add_argument("--feature", type=checks.non_negative_int, required=True, help="the feature's number (from 0)")


def add_browse_commands(ssub) -> None:
    q = ssub.add_parser("index", help="index the SAE's features over a corpus (top/random examples, statistics)",
                        description="Stream a corpus through the model (stopped after the SAE's site), encode "
                                    "the site with the SAE and keep every feature's top and random examples, "
                                    "histogram and firing frequency: the neuron index, with features as units. "
                                    "An interrupted build resumes.")
    add_model_args(q)
    _sae_arg(q)
    unit_index.add_corpus_args(q)
    unit_index.add_window_args(q, "feature")
    q.add_argument("--out", default=None, metavar="DIR", help="index directory (default: DIR/index of the SAE)")
    q.add_argument("--any-model", action="store_true",
                   help="use the SAE even if it names another model (widths must still match)")
    add_json_arg(q, "the manifest")
    q.set_defaults(fn=cmd_index)

    q = ssub.add_parser("show", help="a feature's top and random examples, token pattern and statistics",
                        description="Print a feature's examples, token pattern, statistics and descriptions "
                                    "from its SAE's feature index (no model needed; build it with `sae index`).")
    _index_args(q, feature=True)
    q.add_argument("--top", type=checks.positive_int, default=None, help="show only this many top examples")
    add_json_arg(q, "everything shown (the shape of `neurons show`, with feature for neuron)")
    q.set_defaults(fn=cmd_show)

    q = ssub.add_parser("search", help="find features by description text or by a token they fire on",
                        description="Search the feature index's token patterns, written explanations and "
                                    "imported descriptions (no model needed).")
    _index_args(q)
    unit_index.add_search_args(q, "a token the feature fires on, e.g. ' he'")
    add_json_arg(q, '{"query", "token", "results": [{"layer", "feature", "source", "kind", "description", '
                    '"score", "relevance"}, ...]}')
    q.set_defaults(fn=cmd_search)

    q = ssub.add_parser("explain", help="write an explanation of a feature with a local instruct model and score it",
                        description="Explain a feature from its top examples (as `neurons explain` does for a "
                                    "neuron) and score the explanation by simulation; kept in the feature index.")
    add_model_args(q)
    _index_args(q, feature=True)
    unit_index.add_explain_args(q)
    add_json_arg(q, "the explanation")
    q.set_defaults(fn=cmd_explain)

    q = ssub.add_parser("compare", help="features vs neurons at the SAE's layer: pattern concentration, scores",
                        description="Compare the SAE's features with the MLP neurons of the same layer: mean "
                                    "token-pattern concentration (the top firing token's share of a unit's top "
                                    "activation mass) and mean explanation score. With --explain N, first "
                                    "explain N random live units of each (loads the model; slow).")
    add_model_args(q)
    _index_args(q)
    q.add_argument("--neurons", required=True, metavar="DIR", type=checks.existing("neuron index", "dir"),
                   help="a neuron index of the same model (`neurons index`)")
    q.add_argument("--explain", type=checks.non_negative_int, default=0,
                   help="explain this many random live units of each side first (default 0: use the stored ones)")
    unit_index.add_explainer_arg(q)
    q.add_argument("--seed", type=int, default=0, help="which units --explain draws")
    add_json_arg(q, "the comparison")
    q.set_defaults(fn=cmd_compare)


# ------------------------------------------------------------------------------ checks
def _check_fits_config(sae, model: str | None, any_model: bool = False) -> None:
    """Width, layer and model name of the SAE against the model's config.json and name, before
    the model loads (the load checks again, config hash included)."""
    from explorer.core.session import read_config, resolve_model

    if sae.cfg.site is None:
        raise ExplorerError("the SAE's cfg.json names no hook (metadata.hook_name), so where it reads is unknown")
    config = read_config(model)
    width = config.get("hidden_size", config.get("n_embd"))
    if isinstance(width, int) and width != sae.d_in:
        raise ExplorerError(f"the SAE reads vectors of width {sae.d_in} but the model has d_model {width}: "
                            "it was trained on another model")
    n_layers = config.get("num_hidden_layers", config.get("n_layer"))
    layer = sae.cfg.site[0]
    if isinstance(n_layers, int) and layer >= n_layers:
        raise ExplorerError(f"the SAE reads layer {layer} but the model has layers 0..{n_layers - 1}")
    trained_on = sae.cfg.metadata.get("model_name")
    if trained_on and not any_model:
        name, path = resolve_model(model)

        def short(n) -> str:
            return str(n or "").rstrip("/").split("/")[-1].lower()

        if short(trained_on) not in (short(name), short(path)):
            raise ExplorerError(f"the SAE was trained on {trained_on} but the model is {name}; "
                                "pass --any-model to use it anyway")


def _open(args):
    from explorer.features.units import open_feature_index

    return open_feature_index(args.sae, getattr(args, "index", None))


# ------------------------------------------------------------------------------ commands
def cmd_index(args) -> int:
    from explorer.features.saelens_io import load_sae
    from explorer.features.units import index_features

    sae = load_sae(args.sae)
    _check_fits_config(sae, args.model, args.any_model)
    request = unit_index.index_request(args)
    session = load_session(args)
    index = unit_index.run_with_bar(lambda ctx: index_features(session, args.sae, request, ctx=ctx, out_dir=args.out,
                                                               any_model=args.any_model), "feature-index")
    unit_index.print_built(index, args.json, f" layer {index.layers[0]}: {index.n_units:,} features")
    return 0


def cmd_show(args) -> int:
    index = _open(args)
    layer, feature = index.layers[0], args.feature
    unit_index.show_unit(index, layer, feature, top=args.top, as_json=args.json, quantiles=False,
                         head={"layer": layer, "feature": feature, "sae": str(args.sae)},
                         title=f"feature {feature} (layer {layer}) of {args.sae} over {index.tokens_done:,} tokens")
    return 0


def cmd_search(args) -> int:
    from explorer.neurons.describe import search

    if not args.query and not args.token:
        raise ExplorerError("sae search needs --query TEXT or --token TOKEN")
    index = _open(args)
    hits = search(index, query=args.query, token=args.token, limit=args.limit)
    rows = []
    for h in hits:
        row = {k: v for k, v in h.to_dict().items() if k not in ("type", "neuron")}
        rows.append({"layer": h.layer, "feature": h.neuron, **{k: v for k, v in row.items() if k != "layer"}})
    if args.json:
        print_json({"query": args.query, "token": args.token, "results": rows})
        return 0
    if not hits:
        print("no matching features")
    for h in hits:
        score = unit_index.score_suffix(h.score)
        print(f"F{h.neuron:<7d} {h.relevance:5.2f}  [{h.source}] {h.description}{score}")
    return 0


def cmd_explain(args) -> int:
    from explorer.neurons.describe import explain_neuron

    index = _open(args)
    layer = index.layers[0]
    index.check_neuron(layer, args.feature)
    unit_index.default_model_from_index(args, index)
    session = load_session(args)
    e = explain_neuron(session, index=index, layer=layer, neuron=args.feature, explainer=args.explainer,
                       n_explain=args.n_explain, n_score_top=args.n_score, n_score_random=args.n_score,
                       refresh=args.refresh)
    if args.json:
        data = {k: v for k, v in e.to_dict().items() if k not in ("simulated", "true", "type", "neuron")}
        print_json(dict(data, feature=args.feature))
        return 0
    unit_index.print_explanation(f"feature {args.feature} (layer {layer})", e)
    return 0


def cmd_compare(args) -> int:
    from explorer.neurons.index import NeuronIndex
    from explorer.neurons.units import compare_units, explain_sample

    features = _open(args)
    neurons = NeuronIndex.open(args.neurons)
    if neurons.units is not None:
        raise ExplorerError(f"--neurons {args.neurons} is a {neurons.unit_kind} index, not a neuron index")
    layer = features.layers[0]
    neurons.row(layer)
    if features.manifest["model"].get("config_hash") != neurons.manifest["model"].get("config_hash"):
        raise ExplorerError(f"the feature index is of {features.model_name} but --neurons is of "
                            f"{neurons.model_name}: compare indexes of one model")
    explainer = args.explainer  # without --explain: whose stored explanations to read (None: the shared one)
    if args.explain:
        from explorer.neurons.describe import Explainer

        unit_index.default_model_from_index(args, features)
        session = load_session(args)
        exp = Explainer.load(args.explainer, session)
        explainer = exp.name
        for index in (features, neurons):
            log(f"explaining {args.explain} {index.unit_name}s of layer {layer} …")
            explain_sample(session, index, layer, args.explain, seed=args.seed, explainer=exp)
    c = compare_units(features, neurons, layer=layer, explainer=explainer)
    if args.json:
        data = {k: v for k, v in c.to_dict().items() if k != "type"}
        print_json(data)
        return 0

    def score(v, n, m):
        return "—" if v is None else f"{v:.3f} ({n} of {m} explained have a score)"

    print(f"layer {layer}: features ({c.feature_live:,} live of {c.feature_units:,}) vs neurons "
          f"({c.neuron_live:,} live of {c.neuron_units:,})")
    print(f"  token-pattern concentration  {c.feature_concentration:.3f}  vs  {c.neuron_concentration:.3f}")
    print(f"  single-token units (≥ 50%)   {c.feature_single_token:.1%}  vs  {c.neuron_single_token:.1%}")
    print(f"  mean explanation score       {score(c.feature_mean_score, c.feature_scored, c.feature_explained)}"
          f"  vs  {score(c.neuron_mean_score, c.neuron_scored, c.neuron_explained)}"
          + (f"  [{c.explainer}]" if c.explainer else ""))
    return 0
