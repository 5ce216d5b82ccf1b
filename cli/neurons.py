"""``python -m explorer neurons``: build a neuron index, show, explain, import and search neurons."""
from __future__ import annotations

import sys
from pathlib import Path

from cli import checks
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
    q.add_argument("--corpus", default=None, metavar="PATH", type=checks.existing("corpus"),
                   help="text (one document per line), JSONL, parquet or a saved datasets directory "
                        "(default: the embedded news corpus)")
    q.add_argument("--format", default="auto", choices=["auto", "text", "jsonl", "parquet", "datasets"],
                   help="the corpus format (auto: from the file name and contents)")
    q.add_argument("--text-field", default="text", help="JSONL/parquet/datasets field holding the text")
    q.add_argument("--paragraphs", action="store_true",
                   help="plain text: one document per blank-line-separated paragraph (default: per line)")
    q.add_argument("--split", default=None, help="datasets: the split of a DatasetDict (default: train)")
    q.add_argument("--max-tokens", type=checks.non_negative_int, default=100_000,
                   help="tokens to index (0: the whole corpus)")
    q.add_argument("--window", type=checks.int_between(2, 1_000_000), default=64,
                   help="tokens per example window")
    q.add_argument("--top-k", type=checks.positive_int, default=20, help="top examples kept per neuron")
    q.add_argument("--n-random", type=checks.non_negative_int, default=20,
                   help="random example windows kept (shared by all neurons)")
    q.add_argument("--batch-windows", type=checks.positive_int, default=16, help="windows per forward pass")
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
    q.add_argument("--explainer", default=None, metavar="PATH_OR_ID",
                   help="local instruct model directory or cached hub id (default: the attached model)")
    q.add_argument("--n-explain", type=checks.positive_int, default=10, help="top examples shown to the explainer")
    q.add_argument("--n-score", type=checks.positive_int, default=10,
                   help="held-out top examples and random examples simulated for the score (each)")
    q.add_argument("--refresh", action="store_true", help="recompute even if a cached explanation exists")
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
    q.add_argument("--query", default=None, type=checks.text, help="words that must all appear in a description")
    q.add_argument("--token", default=None, type=checks.token,
                   help="a token the neuron fires on, e.g. ' he' (or he)")
    q.add_argument("--limit", type=checks.positive_int, default=50, help="results shown, at most")
    add_json_arg(q, "the results")
    q.set_defaults(fn=cmd_search)


# ------------------------------------------------------------------------------ index
def cmd_index(args) -> int:
    from tqdm import tqdm

    from explorer.core.jobs import Job
    from explorer.neurons.index import IndexRequest, build_index

    corpus = args.corpus
    request = IndexRequest(corpus_path=corpus, max_tokens=args.max_tokens or None, window=args.window,
                           top_k=args.top_k, n_random=args.n_random, batch_windows=args.batch_windows,
                           corpus_format=args.format, text_field=args.text_field,
                           text_mode="paragraphs" if args.paragraphs else "lines", split=args.split)
    session = load_session(args)
    bar = tqdm(total=0, unit="tok", unit_scale=True, desc="indexing", file=sys.stderr, dynamic_ncols=True)

    def on_progress(progress, _partial) -> None:
        bar.total = progress.total
        bar.n = progress.done
        bar.set_postfix_str(progress.message, refresh=False)
        bar.refresh()

    try:
        index = Job(lambda ctx: build_index(session, request, out_dir=args.out, ctx=ctx), name="neuron-index",
                    on_progress=on_progress).run()
    finally:
        bar.close()
    if args.json:
        print_json(dict(index.manifest, path=str(index.path)))
    else:
        m = index.manifest
        print(f"{index.path}\n{m['model']['name']}: {index.n_layers} layers × {index.d_mlp} neurons, "
              f"{index.tokens_done:,} tokens of {m['corpus']['path']} in {m['elapsed_s']:.0f} s")
    return 0


# ------------------------------------------------------------------------------ show
def example_json(e) -> dict:
    return {"tokens": [str(t) for t in e.tokens], "token_ids": [int(i) for i in e.token_ids],
            "position": e.position, "activation": e.activation, "token": e.token,
            "window_index": e.window_index, "doc": e.doc, "offset": e.offset}


def example_context(e, before: int = 12, after: int = 3) -> str:
    lo, hi = max(0, e.position - before), min(len(e.tokens), e.position + after + 1)
    pieces = [repr(str(t))[1:-1] for t in e.tokens[lo:hi]]
    k = e.position - lo
    pieces[k] = f"[[{pieces[k]}]]"
    return ("…" if lo > 0 else "") + "".join(pieces) + ("…" if hi < len(e.tokens) else "")


def cmd_show(args) -> int:
    from explorer.neurons.describe import DescriptionStore, token_pattern
    from explorer.neurons.index import NeuronIndex

    index = NeuronIndex.open(args.index)
    index.check_neuron(args.layer, args.neuron)
    top = index.top_examples(args.layer, args.neuron, args.top)
    rand = index.random_examples(args.layer, args.neuron)
    pattern = token_pattern(index, args.layer, args.neuron)
    stats = index.stats(args.layer, args.neuron)
    descriptions = DescriptionStore(index.path).for_neuron(args.layer, args.neuron)
    if args.json:
        print_json({"layer": args.layer, "neuron": args.neuron, "model": index.model_name,
                    "tokens_indexed": index.tokens_done, "top": [example_json(e) for e in top],
                    "random": [example_json(e) for e in rand], "pattern": pattern.summary,
                    "pattern_detail": pattern.to_dict(), "stats": stats.to_dict(),
                    "descriptions": descriptions})
        return 0
    print(f"L{args.layer} N{args.neuron} of {index.model_name} over {index.tokens_done:,} tokens")
    print(f"  {pattern.summary}")
    qs = ", ".join(f"p{100 * q:g} {v:.3g}" for q, v in zip(stats.quantile_levels, stats.quantiles))
    print(f"  max {stats.max:.4g}, mean {stats.mean:.3g}, std {stats.std:.3g}, fires (>0) on "
          f"{stats.frequency:.1%} of tokens; ≈ {qs}")
    for d in descriptions:
        score = "" if d.get("score") is None else f" (score {d['score']:.3f})"
        print(f"  [{d['source']}] {d['description']}{score}")
    print("top examples:")
    for i, e in enumerate(top):
        print(f"  {i + 1:3d}  {e.activation:9.4g}  {example_context(e)}")
    print("random examples:")
    for e in rand[:10]:
        print(f"       {e.activation:9.4g}  {example_context(e)}")
    return 0


# ------------------------------------------------------------------------------ explain
def cmd_explain(args) -> int:
    from explorer.neurons.describe import explain_neuron
    from explorer.neurons.index import NeuronIndex

    index = NeuronIndex.open(args.index)
    index.check_neuron(args.layer, args.neuron)
    if args.model is None:  # the index's own model, where it still is
        path = index.manifest["model"].get("path")
        if path and Path(path).is_dir():
            args.model = path
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
    print(f"L{args.layer} N{args.neuron}: responds to {result.explanation or '(no explanation)'}")
    print(f"  score {result.score_text} ({result.score_note}; {result.n_top} top + {result.n_random} random "
          f"examples, explainer {result.explainer})")
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
        score = "" if h.score is None else f" (score {h.score:.3f})"
        print(f"L{h.layer:<3d} N{h.neuron:<6d} {h.relevance:5.2f}  [{h.source}] {h.description}{score}")
    return 0
