"""What ``neurons`` and ``sae index|show|search|explain`` share: an index of units (MLP neurons or
SAE features) is built with the same options and progress bar, and one unit prints the same way.

``neurons show`` and ``sae show`` print one JSON shape; only the unit's key (``neuron`` or
``feature``) and the heading differ.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cli import checks
from cli.common import print_json


# ------------------------------------------------------------------------------ building
def add_corpus_args(q) -> None:
    """--corpus, --format, --text-field: where the index's text comes from."""
    q.add_argument("--corpus", default=None, metavar="PATH", type=checks.existing("corpus"),
                   help="text (one document per line), JSONL, parquet or a saved datasets directory "
                        "(default: the embedded news corpus)")
    q.add_argument("--format", default="auto", choices=["auto", "text", "jsonl", "parquet", "datasets"],
                   help="the corpus format (auto: from the file name and contents)")
    q.add_argument("--text-field", default="text", help="JSONL/parquet/datasets field holding the text")


def add_window_args(q, unit: str) -> None:
    """--max-tokens, --window, --top-k, --n-random, --batch-windows; ``unit`` is "neuron" or "feature"."""
    q.add_argument("--max-tokens", type=checks.non_negative_int, default=100_000,
                   help="tokens to index (0: the whole corpus)")
    q.add_argument("--window", type=checks.int_between(2, 1_000_000), default=64, help="tokens per example window")
    q.add_argument("--top-k", type=checks.positive_int, default=20, help=f"top examples kept per {unit}")
    q.add_argument("--n-random", type=checks.non_negative_int, default=20,
                   help=f"random example windows kept (shared by all {unit}s)")
    q.add_argument("--batch-windows", type=checks.positive_int, default=16, help="windows per forward pass")


def add_explainer_arg(q) -> None:
    q.add_argument("--explainer", default=None, metavar="PATH_OR_ID",
                   help="local instruct model directory or cached hub id (default: the attached model); "
                        "'tokens': list the unit's firing tokens and simulate by matching them (no model)")


def add_explain_args(q) -> None:
    """--explainer, --n-explain, --n-score, --refresh: how a unit's explanation is written and scored."""
    add_explainer_arg(q)
    q.add_argument("--n-explain", type=checks.positive_int, default=10, help="top examples shown to the explainer")
    q.add_argument("--n-score", type=checks.positive_int, default=10,
                   help="held-out top examples and random examples simulated for the score (each)")
    q.add_argument("--refresh", action="store_true", help="recompute even if a cached explanation exists")


def add_search_args(q, token_help: str) -> None:
    """--query, --token, --limit of a description search."""
    q.add_argument("--query", default=None, type=checks.text, help="words that must all appear in a description")
    q.add_argument("--token", default=None, type=checks.token, help=token_help)
    q.add_argument("--limit", type=checks.positive_int, default=50, help="results shown, at most")


def index_request(args, **extra):
    """The IndexRequest that the options of ``add_corpus_args`` and ``add_window_args`` ask for."""
    from explorer.neurons.index import IndexRequest

    return IndexRequest(corpus_path=args.corpus, max_tokens=args.max_tokens or None, window=args.window,
                        top_k=args.top_k, n_random=args.n_random, batch_windows=args.batch_windows,
                        corpus_format=args.format, text_field=args.text_field, **extra)


def run_with_bar(work: Callable[[Any], Any], name: str):
    """Run ``work(ctx)`` as a job with a token progress bar on stderr; return its result."""
    from tqdm import tqdm

    from explorer.core.jobs import Job

    bar = tqdm(total=0, unit="tok", unit_scale=True, desc="indexing", file=sys.stderr, dynamic_ncols=True)

    def on_progress(progress, _partial) -> None:
        bar.total, bar.n = progress.total, progress.done
        bar.set_postfix_str(progress.message, refresh=False)
        bar.refresh()

    try:
        return Job(work, name=name, on_progress=on_progress).run()
    finally:
        bar.close()


def print_built(index, as_json: bool, units: str) -> None:
    """A finished index build: its manifest as JSON, or its path and a line of what it holds
    (``units``, after the model's name: ": 30 layers × 1536 neurons")."""
    if as_json:
        print_json(dict(index.manifest, path=str(index.path)))
        return
    m = index.manifest
    print(f"{index.path}\n{m['model']['name']}{units}, {index.tokens_done:,} tokens of {m['corpus']['path']} "
          f"in {m['elapsed_s']:.0f} s")


def default_model_from_index(args, index) -> None:
    """--model defaults to the index's own model, where it still is."""
    if args.model is None:
        path = index.manifest["model"].get("path")
        if path and Path(path).is_dir():
            args.model = path


# ------------------------------------------------------------------------------ one unit
def example_json(e) -> dict:
    """One example window as JSON."""
    return {"tokens": [str(t) for t in e.tokens], "token_ids": [int(i) for i in e.token_ids],
            "position": e.position, "activation": e.activation, "token": e.token,
            "window_index": e.window_index, "doc": e.doc, "offset": e.offset}


def example_context(e, before: int = 12, after: int = 3) -> str:
    """The tokens around an example's position on one line, the position in [[ ]]."""
    lo, hi = max(0, e.position - before), min(len(e.tokens), e.position + after + 1)
    pieces = [repr(str(t))[1:-1] for t in e.tokens[lo:hi]]
    k = e.position - lo
    pieces[k] = f"[[{pieces[k]}]]"
    return ("…" if lo > 0 else "") + "".join(pieces) + ("…" if hi < len(e.tokens) else "")


def score_suffix(score: float | None) -> str:
    """`` (score 0.123)``, or nothing where there is no score."""
    return "" if score is None else f" (score {score:.3f})"


def show_unit(index, layer: int, unit: int, *, top: int | None, as_json: bool, head: dict, title: str,
              quantiles: bool = True) -> None:
    """Print a unit's token pattern, statistics, descriptions, top and random examples (or their JSON).

    ``head`` opens the JSON (``{"layer", "neuron"}`` or ``{"layer", "feature", "sae"}``); ``title``
    heads the text; ``quantiles`` adds the std and activation quantiles to the statistics line.
    """
    from explorer.neurons.describe import DescriptionStore, token_pattern

    index.check_neuron(layer, unit)
    top_examples = index.top_examples(layer, unit, top)
    rand = index.random_examples(layer, unit)
    pattern = token_pattern(index, layer, unit)
    stats = index.stats(layer, unit)
    descriptions = DescriptionStore(index.path).for_neuron(layer, unit)
    if as_json:
        print_json({**head, "model": index.model_name, "tokens_indexed": index.tokens_done,
                    "top": [example_json(e) for e in top_examples], "random": [example_json(e) for e in rand],
                    "pattern": pattern.summary, "pattern_detail": pattern.to_dict(), "stats": stats.to_dict(),
                    "descriptions": descriptions})
        return
    print(title)
    print(f"  {pattern.summary}")
    if quantiles:
        qs = ", ".join(f"p{100 * q:g} {v:.3g}" for q, v in zip(stats.quantile_levels, stats.quantiles))
        print(f"  max {stats.max:.4g}, mean {stats.mean:.3g}, std {stats.std:.3g}, fires (>0) on "
              f"{stats.frequency:.1%} of tokens; ≈ {qs}")
    else:
        print(f"  max {stats.max:.4g}, mean {stats.mean:.3g}, fires (>0) on {stats.frequency:.1%} of tokens")
    for d in descriptions:
        print(f"  [{d['source']}] {d['description']}{score_suffix(d.get('score'))}")
    print("top examples:")
    for i, e in enumerate(top_examples):
        print(f"  {i + 1:3d}  {e.activation:9.4g}  {example_context(e)}")
    print("random examples:")
    for e in rand[:10]:
        print(f"       {e.activation:9.4g}  {example_context(e)}")


def print_explanation(label: str, e) -> None:
    """A unit's written explanation and its simulation score, in two lines."""
    print(f"{label}: responds to {e.explanation or '(no explanation)'}")
    print(f"  score {e.score_text} ({e.score_note}; {e.n_top} top + {e.n_random} random examples, "
          f"explainer {e.explainer})")
