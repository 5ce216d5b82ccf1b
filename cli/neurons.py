"""``python -m explorer neurons``: build a neuron index, show, explain, import and search neurons."""
from __future__ import annotations

from cli import checks, unit_index
from cli.common import add_json_arg, add_model_args, add_snapshot_arg, load_session, maybe_snapshot, print_json
from explorer.core.errors import ExplorerError


def add_commands(sub) -> None:
    p = sub.add_parser("neurons", help="neuron index: top examples, descriptions, explanations, search",
                       description="Index every MLP neuron's top-activating and random examples over a corpus, "
                                   "then show, explain (written explanation scored by simulation), import "
                                   "descriptions and search them.")
    nsub = p.add_subparsers(dest="neurons_command", required=True, metavar="ACTION",
                            help="index, show, explain, import or search")

    q = nsub.add_parser("index", help="build (or resume) a neuron index over a corpus",
                        description="Stream a corpus through the model and keep, per MLP neuron, its "
                                    "top-activating and random example windows and activation statistics. "
                                    "An interrupted build resumes from its last checkpoint.")
    add_model_args(q)
    unit_index.add_corpus_args(q)
    q.add_argument("--paragraphs", action="store_true",
                   help="plain text: one document per blank-line-separated paragraph (default: per line)")
    q.add_argument("--split", default=None, help="datasets: the split of a DatasetDict (default: train)")
    unit_index.add_window_args(q, "neuron")
    q.add_argument("--out", default=None, metavar="DIR",
                   help="index directory (default: the cache, keyed by model, corpus and settings)")
    add_json_arg(q, "the manifest")
    q.set_defaults(fn=cmd_index)

    q = nsub.add_parser("show", help="a neuron's top and random examples, token pattern and statistics",
                        description="Print a neuron's examples, token pattern, statistics and descriptions "
                                    "from an index (no model needed).")
    q.add_argument("--index", required=True, metavar="DIR", help="the index directory")
    q.add_argument("--layer", type=checks.non_negative_int, required=True, help="the neuron's layer (from 0)")
    q.add_argument("--neuron", type=checks.non_negative_int, required=True, help="the neuron's number (from 0)")
    q.add_argument("--top", type=checks.positive_int, default=None, help="show only this many top examples")
    add_json_arg(q, "everything shown")
    q.set_defaults(fn=cmd_show)

    q = nsub.add_parser("explain", help="write an explanation with a local instruct model and score it",
                        description="Write a short explanation of a neuron from its top examples with a "
                                    "local instruct model, and score it by how well the model simulates "
                                    "the neuron's activations from it (Bills et al. 2023).")
    add_model_args(q)
    q.add_argument("--index", required=True, metavar="DIR", help="the index directory")
    q.add_argument("--layer", type=checks.non_negative_int, required=True, help="the neuron's layer (from 0)")
    q.add_argument("--neuron", type=checks.non_negative_int, required=True, help="the neuron's number (from 0)")
    unit_index.add_explain_args(q)
    add_json_arg(q, "the explanation")
    add_snapshot_arg(q)
    q.set_defaults(fn=cmd_explain)

    q = nsub.add_parser("import", help="import neuron records, explanations (OpenAI JSON) or a CSV",
                        description="Import neuron descriptions made elsewhere into an index's description "
                                    "store, so that they show and can be searched.")
    q.add_argument("file", type=checks.existing("file"),
                   help="NeuronRecord JSON, explanations JSON/JSONL, CSV (layer,neuron,description), "
                        "or a directory of them")
    q.add_argument("--index", required=True, metavar="DIR", help="directory holding the descriptions")
    q.add_argument("--kind", default="auto", choices=["auto", "records", "explanations", "csv"],
                   help="what the file holds (auto: from its extension and contents)")
    q.add_argument("--source", default=None, help="label for the imported descriptions")
    add_json_arg(q, "the count")
    q.set_defaults(fn=cmd_import)

    q = nsub.add_parser("search", help="find neurons by description text or by a token they fire on",
                        description="Search token patterns, written explanations and imported descriptions.")
    q.add_argument("--index", required=True, metavar="DIR", type=checks.existing("index directory", "dir"),
                   help="the index directory")
    unit_index.add_search_args(q, "a token the neuron fires on, e.g. ' he' (or he)")
    add_json_arg(q, "the results")
    q.set_defaults(fn=cmd_search)


# ------------------------------------------------------------------------------ index
def cmd_index(args) -> int:
    from explorer.neurons.index import build_index

    request = unit_index.index_request(args, text_mode="paragraphs" if args.paragraphs else "lines", split=args.split)
    session = load_session(args)
    index = unit_index.run_with_bar(lambda ctx: build_index(session, request, out_dir=args.out, ctx=ctx),
                                    "neuron-index")
    unit_index.print_built(index, args.json, f": {index.n_layers} layers × {index.d_mlp} neurons")
    return 0


# ------------------------------------------------------------------------------ show
def cmd_show(args) -> int:
    from explorer.neurons.index import NeuronIndex

    index = NeuronIndex.open(args.index)
    unit_index.show_unit(index, args.layer, args.neuron, top=args.top, as_json=args.json,
                         head={"layer": args.layer, "neuron": args.neuron},
                         title=f"L{args.layer} N{args.neuron} of {index.model_name} over {index.tokens_done:,} tokens")
    return 0


# ------------------------------------------------------------------------------ explain
def cmd_explain(args) -> int:
    from explorer.neurons.describe import explain_neuron
    from explorer.neurons.index import NeuronIndex

    index = NeuronIndex.open(args.index)
    index.check_neuron(args.layer, args.neuron)
    unit_index.default_model_from_index(args, index)
    session = load_session(args)
    result = explain_neuron(session, index=index, layer=args.layer, neuron=args.neuron, explainer=args.explainer,
                            n_explain=args.n_explain, n_score_top=args.n_score, n_score_random=args.n_score,
                            refresh=args.refresh)
    maybe_snapshot(args, session, result, f"neuron L{args.layer} N{args.neuron} explanation")
    if args.json:
        data = result.to_dict()
        data.pop("simulated")
        data.pop("true")
        print_json(data)
        return 0
    unit_index.print_explanation(f"L{args.layer} N{args.neuron}", result)
    return 0


# ------------------------------------------------------------------------------ import / search
def cmd_import(args) -> int:
    from explorer.neurons.describe import import_descriptions

    n = import_descriptions(args.index, args.file, kind=args.kind, source=args.source)
    if args.json:
        print_json({"imported": n, "index": args.index})
    else:
        print(f"imported {n} descriptions into {args.index}")
    return 0


def cmd_search(args) -> int:
    from explorer.neurons.describe import search

    if not args.query and not args.token:
        raise ExplorerError("neurons search needs --query TEXT or --token TOKEN")
    hits = search(args.index, query=args.query, token=args.token, limit=args.limit)
    if args.json:
        print_json({"query": args.query, "token": args.token,
                    "results": [{k: v for k, v in h.to_dict().items() if k != "type"} for h in hits]})
        return 0
    if not hits:
        print("no matching neurons")
    for h in hits:
        score = unit_index.score_suffix(h.score)
        print(f"L{h.layer:<3d} N{h.neuron:<6d} {h.relevance:5.2f}  [{h.source}] {h.description}{score}")
    return 0
