"""``python -m explorer heads``: head scores and DLA of a prompt, or one head's pattern."""
from __future__ import annotations

from cli import checks
from cli.common import add_json_arg, add_model_args, add_snapshot_arg, load_session, maybe_snapshot, print_json

# Score name -> (heading, largest first?) for the readable table.
_TABLE = {
    "previous_token": ("previous-token", True),
    "induction": ("induction (repeated random tokens)", True),
    "duplicate_token": ("duplicate-token (repeated random tokens)", True),
    "bos": ("sink: attention to position 0", True),
    "entropy": ("lowest attention entropy (nats)", False),
}


def _shown(text: str, width: int = 12) -> str:
    text = repr(str(text))[1:-1]
    return text if len(text) <= width else text[: width - 1] + "…"


def scores_json(result, threshold: float) -> dict:
    """The heads command's JSON: scores as [layer][head] lists, roles, target and DLA summary."""
    dla = result.attribution
    return {
        "type": type(result).__name__,
        "model": result.model,
        "prompt": result.request.prompt,
        "tokens": result.tokens.tolist(),
        "target": dla.target,
        "target_id": dla.target_id,
        "logit": dla.logit,
        "seq_len": result.request.seq_len,
        "seed": result.request.seed,
        "random_ids": result.random_ids.tolist(),
        "scores": {name: values.tolist() for name, values in result.scores().items()},
        "threshold": threshold,
        "roles": [{"layer": layer, "head": head, "roles": list(roles)}
                  for (layer, head), roles in result.roles(threshold).items()],
        "dla": {"logit": dla.logit, "embed": dla.embed, "attn_bias": dla.attn_bias.tolist(),
                "mlp": dla.mlp.tolist(), "final_norm_bias": dla.final_norm_bias,
                "unembed_bias": dla.unembed_bias, "unexplained": dla.unexplained},
    }


def _print_scores(result, top: int, threshold: float) -> None:
    dla = result.attribution
    print(f"prompt tokens: {' | '.join(_shown(t) for t in result.tokens)}")
    print(f"{result.n_layers} layers × {result.n_heads} heads; induction/duplicate on "
          f"{result.request.seq_len} random tokens ×2 (seed {result.request.seed})\n")
    for name, (heading, largest) in _TABLE.items():
        cells = "  ".join(f"L{l}H{h} {v:.3f}" for l, h, v in result.top(name, top, largest=largest))
        print(f"{heading}:\n  {cells}")
    print(f"\ndirect logit attribution to {dla.target!r} (id {dla.target_id}), logit {dla.logit:.4f}:")
    for label, largest in (("pushes up", True), ("pushes down", False)):
        cells = "  ".join(f"L{l}H{h} {v:+.3f}" for l, h, v in result.top("dla", top, largest=largest))
        print(f"  {label:<12}{cells}")
    print(f"  embeddings {dla.embed:+.3f}, all heads {dla.heads.sum():+.3f}, attention biases "
          f"{dla.attn_bias.sum():+.3f}, MLPs {dla.mlp.sum():+.3f}, final norm bias "
          f"{dla.final_norm_bias:+.3f}, unembedding bias {dla.unembed_bias:+.3f}; "
          f"unexplained {dla.unexplained:+.2e}")
    roles = result.roles(threshold)
    by_role: dict[str, list[str]] = {}
    for (layer, head), labels in roles.items():
        for label in labels:
            by_role.setdefault(label, []).append(f"L{layer}H{head}")
    print(f"\nroles (score ≥ {threshold}):")
    for label, heads in by_role.items():
        shown = " ".join(heads[:24]) + (f" … (+{len(heads) - 24})" if len(heads) > 24 else "")
        print(f"  {label:<15}{len(heads):4d}  {shown}")
    if not by_role:
        print("  none")


def _print_pattern(pattern, max_pos: int = 16) -> None:
    t = len(pattern.tokens)
    show = list(range(max(0, t - max_pos), t))
    print(f"L{pattern.layer}H{pattern.head} attention (rows: query, columns: key), "
          f"last {len(show)} of {t} positions")
    print(f"{'':>14}" + "".join(f"{_shown(pattern.tokens[k], 7):>8}" for k in show))
    for q in show:
        row = "".join(f"{pattern.pattern[q, k]:8.3f}" if k <= q else f"{'':>8}" for k in show)
        print(f"{_shown(pattern.tokens[q]):>14}{row}")


def cmd_heads(args) -> int:
    from explorer.analyses.heads import HeadsRequest, head_pattern, head_scores

    seq_len = HeadsRequest.seq_len if args.seq_len is None else args.seq_len  # the dataclass default
    if args.pattern is not None:
        checks.check_head(args.model, *args.pattern)  # against config.json, before loading
    session = load_session(args)
    if args.pattern is not None:
        layer, head = args.pattern
        pattern = head_pattern(session, args.prompt, layer=layer, head=head)
        maybe_snapshot(args, session, pattern, f"pattern L{pattern.layer}H{pattern.head}: {args.prompt[:40]}")
        if args.json:
            print_json(pattern.to_dict())
        else:
            _print_pattern(pattern)
        return 0
    result = head_scores(session, HeadsRequest(args.prompt, args.target, seq_len, args.seed))
    maybe_snapshot(args, session, result, f"heads: {args.prompt[:60]}")
    if args.json:
        print_json(scores_json(result, args.threshold))
    else:
        _print_scores(result, args.top, args.threshold)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("heads", help="attention-head scores and direct logit attribution (or one head's pattern)",
                       description="Score every attention head (previous-token, induction, duplicate-token, "
                                   "attention sink, entropy) and split the target's final logit into each "
                                   "head's direct contribution; or print one head's attention pattern.")
    add_model_args(p)
    p.add_argument("--prompt", required=True, type=checks.text, help="the text to analyse")
    p.add_argument("--target", default=None, type=checks.token,
                   help="target token for DLA, e.g. ' Paris' or '#1234' (default: the final top-1)")
    p.add_argument("--pattern", default=None, metavar="L.H", type=checks.head_spec,
                   help="print this head's attention pattern instead of the scores, e.g. 17.4")
    p.add_argument("--seq-len", type=checks.positive_int, default=None,
                   help="random tokens per copy for the induction/duplicate scores (default 24)")
    p.add_argument("--seed", type=checks.non_negative_int, default=0, help="seed of the random tokens")
    p.add_argument("--top", type=checks.positive_int, default=5, help="heads per score in the table")
    p.add_argument("--threshold", type=float, default=0.5, help="score a head needs for a role label")
    add_json_arg(p)
    add_snapshot_arg(p)
    p.set_defaults(fn=cmd_heads)
