"""Head scores + DLA on a ~64-token prompt vs one plain forward with ``output_attentions=True``.

The reference is a separate, unwrapped copy of the model loaded with the eager attention
implementation (the one that returns weights). Both run in the same process, interleaved, and
each time is the median of ``--reps`` runs; the project's result cache is cleared before each
run so every call does its model work. "cold" is the first head-scores request of a session
(the prompt and the repeated random tokens, two invokes of one trace); "random-token scores
cached" is any later prompt (the induction/duplicate scores depend only on seq_len and seed). The issue's budget: heads/plain ≤ 1.5.

    python benchmarks/heads.py [--model PATH] [--tokens 64] [--seq-len 24] [--reps 9] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

TEXT = (
    "The history of the city begins with a small fishing village on the river. Over the "
    "centuries it grew into a market town, then a port, and finally the capital of a large "
    "province. Merchants from distant lands came to trade wool, salt and spices, and the city "
    "built walls, bridges and a cathedral whose tower can still be seen from the hills."
)


def main() -> None:
    from transformers import AutoModelForCausalLM

    from explorer.analyses.heads import HeadsRequest, attention_patterns, direct_logit_attribution, head_scores
    from explorer.core.session import ModelSession

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=HeadsRequest.seq_len)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    session = ModelSession.load(args.model, device=args.device, dtype="float32")
    plain = AutoModelForCausalLM.from_pretrained(session.path, dtype=torch.float32, local_files_only=True,
                                                 attn_implementation="eager").to(args.device).eval()
    plain.config.use_cache = False
    ids = session.tokenizer(TEXT * 4).input_ids[: args.tokens]
    prompt = session.tokenizer.decode(ids)
    t = session.encode(prompt).numel()
    x = torch.tensor([ids], device=args.device)

    def sync() -> None:
        if session.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn) -> float:
        sync()
        start = time.perf_counter()
        inner = fn()
        sync()
        return inner if inner is not None else time.perf_counter() - start

    def plain_forward() -> None:
        with torch.no_grad():
            plain(x, output_attentions=True)

    def project(fn):
        def run() -> None:
            session.clear_cache()
            fn()
        return run

    def warm() -> float:
        """A new prompt after an earlier one: the random-sequence scores come from the cache."""
        session.clear_cache()
        head_scores(session, HeadsRequest("Hello there", seq_len=args.seq_len))
        sync()
        start = time.perf_counter()
        head_scores(session, HeadsRequest(prompt, seq_len=args.seq_len))
        sync()
        return time.perf_counter() - start

    def plain_forward_last() -> None:
        with torch.no_grad():
            plain(x, output_attentions=True, logits_to_keep=1)

    tasks = {
        "plain forward, output_attentions": plain_forward,
        "  same, logits_to_keep=1 (fairer)": plain_forward_last,
        "head_scores, cold (2 invokes)": project(lambda: head_scores(session, HeadsRequest(prompt, seq_len=args.seq_len))),
        "head_scores, random-token scores cached": warm,
        "attention_patterns": project(lambda: attention_patterns(session, prompt)),
        "direct_logit_attribution": project(lambda: direct_logit_attribution(session, prompt)),
    }
    for fn in tasks.values():  # warm up (lazy weights, allocator)
        fn()
    times: dict[str, list[float]] = {k: [] for k in tasks}
    for _ in range(args.reps):
        for name, fn in tasks.items():
            times[name].append(timed(fn))
    base = statistics.median(times["plain forward, output_attentions"])
    fair = statistics.median(times["  same, logits_to_keep=1 (fairer)"])
    print(f"{session.name} on {session.device}, {torch.get_num_threads()} threads, prompt {t} tokens, "
          f"random sequence {args.seq_len}×2 (+BOS), median of {args.reps}")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"  {name:<42} {med * 1e3:8.1f} ms  (min {min(values) * 1e3:7.1f})  "
              f"ratio {med / base:5.2f}  (vs logits_to_keep=1: {med / fair:5.2f})")


if __name__ == "__main__":
    main()
