"""Generation on the embedded default model: the engine vs transformers' ``generate``, plain and steered.

In one process, interleaved (``common.rotate``), greedy, ``--new`` tokens after a corpus prompt:

- hf: ``model.generate(do_sample=False)`` on a separate, never-wrapped copy of the model;
- engine: ``explorer.interventions.generate.generate`` (KV cache, one token per forward);
- hf steered: the same ``generate`` with a plain forward hook adding α·v to block L's output;
- engine steered: ``generate`` with ``Intervention(steer=v, layer=L, alpha=α)`` (B arm only);
- engine A/B: both arms in one batch (for information: two generations for the price of ~one).

Tokens are checked equal (engine vs hf, plain and steered). Also: the first token's latency
(call → first ``on_token``) for the plain prompt and with the chat template. Target: engine
tokens/s ≥ 0.9× hf's, plain and steered; first token ≤ 1 s.

    python benchmarks/generate.py [--new 32] [--reps 3] [--threads 2] [--device cpu]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import fmt_time, machine_line, median, rotate, set_threads, spread  # noqa: E402


def first_token_seconds(generate, session, prompt: str, chat: bool) -> float:
    """Seconds from the call to the first token's callback (what the page waits for)."""
    seen: list[float] = []
    t0 = time.perf_counter()
    generate(session, prompt, max_new_tokens=2, chat=chat,
             on_token=lambda step, pieces: seen.append(time.perf_counter() - t0))
    return seen[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", type=int, default=32, help="tokens generated per run")
    ap.add_argument("--reps", type=int, default=3, help="timed runs per method")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    ap.add_argument("--layer", type=int, default=10, help="the steered block")
    ap.add_argument("--alpha", type=float, default=4.0, help="the steering coefficient")
    args = ap.parse_args()
    if args.device == "cpu":
        set_threads(args.threads)
    from transformers import AutoModelForCausalLM, GenerationConfig

    from benchmarks.sweep import corpus_prompt
    from explorer.core.defaults import ensure_default_model
    from explorer.core.session import ModelSession
    from explorer.interventions.generate import Intervention, generate
    from explorer.interventions.steering import build_vector

    path = str(ensure_default_model())
    session = ModelSession.load(path, device=args.device, dtype=args.dtype)
    dtype = session.dtype
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
    prompt = corpus_prompt(session, 16)
    ids = session.encode(prompt)
    vec = build_vector(session, positive=("I love this movie", "What a wonderful day"),
                       negative=("I hate this movie", "What a terrible day"), layer=args.layer)
    v = torch.from_numpy(vec.vector).to(args.device, dtype)
    iv = Intervention(steer=vec.vector, layer=args.layer, alpha=args.alpha)
    cfg = GenerationConfig(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                           eos_token_id=session.tokenizer.eos_token_id, pad_token_id=session.tokenizer.eos_token_id)
    x = ids[None].to(args.device)

    def hf_plain():
        with torch.no_grad():
            return ref.generate(x, attention_mask=torch.ones_like(x), generation_config=cfg)[0, ids.numel():]

    def hf_steered():
        block = ref.get_submodule("model.layers")[args.layer]

        def add(mod, a, out):
            return (out[0] + args.alpha * v,) + tuple(out[1:]) if isinstance(out, tuple) else out + args.alpha * v

        h = block.register_forward_hook(add)
        try:
            return hf_plain()
        finally:
            h.remove()

    # Same length in both (HF's min_new_tokens masks the EOS; the engine stops at one): checked below.
    engine_plain = lambda: generate(session, prompt, max_new_tokens=args.new)  # noqa: E731
    engine_steered = lambda: generate(session, prompt, max_new_tokens=args.new, intervention=iv,  # noqa: E731
                                      compare=False)
    engine_ab = lambda: generate(session, prompt, max_new_tokens=args.new, intervention=iv)  # noqa: E731

    sync = (lambda: torch.cuda.synchronize()) if args.device.startswith("cuda") else (lambda: None)
    got, want = engine_plain().baseline.token_ids.tolist(), hf_plain().tolist()
    got_s, want_s = engine_steered().intervened.token_ids.tolist(), hf_steered().tolist()
    same = got == want[:len(got)] and got_s == want_s[:len(got_s)]
    print(machine_line())
    print(f"device {args.device}, {args.dtype}; prompt {ids.numel()} tokens, {args.new} new tokens, greedy; "
          f"steering at L{args.layer}, α = {args.alpha:g}")
    print(f"tokens equal to transformers' generate: plain {got == want[:len(got)]} ({len(got)} tokens), "
          f"steered {got_s == want_s[:len(got_s)]} ({len(got_s)} tokens)")
    if len(got) < args.new or len(got_s) < args.new:
        print("note: an arm stopped at the end-of-sequence token before --new tokens; rates use the tokens made")

    cpu: dict[str, list[float]] = {}

    def timed(name, fn):
        # Wall time (``rotate``) and this process's CPU time: on a shared CPU the second is the
        # steadier figure (other processes' load stretches wall time, not our CPU time).
        def run():
            c0 = time.process_time()
            fn()
            sync()
            cpu.setdefault(name, []).append(time.process_time() - c0)
        return run

    methods = {"hf": hf_plain, "engine": engine_plain, "hf steered": hf_steered,
               "engine steered": engine_steered, "engine A/B": engine_ab}
    times = rotate({k: timed(k, f) for k, f in methods.items()}, reps=args.reps)
    cpu = {k: v[-args.reps:] for k, v in cpu.items()}   # the timed calls, not the warm-up
    n = {"hf": len(want), "engine": len(got), "hf steered": len(want_s), "engine steered": len(got_s),
         "engine A/B": len(got)}
    print("\n| method | wall median | wall spread | tokens/s (wall) | vs hf (wall) | CPU median | vs hf (CPU) |")
    print("|---|---|---|---|---|---|---|")
    rate = {k: n[k] / median(t) for k, t in times.items()}
    crate = {k: n[k] / median(t) for k, t in cpu.items()}
    for k, t in times.items():
        ref_key = "hf steered" if "steered" in k else "hf"
        print(f"| {k} | {fmt_time(median(t))} | {spread(t)} | {rate[k]:.1f} | {rate[k] / rate[ref_key]:.2f}× | "
              f"{fmt_time(median(cpu[k]))} | {crate[k] / crate[ref_key]:.2f}× |")

    firsts = []
    for chat in (False, True):
        samples = []
        for _ in range(max(3, args.reps)):
            samples.append(first_token_seconds(generate, session, prompt, chat))
        firsts.append(median(samples))
        print(f"first token ({'chat template' if chat else 'plain prompt'}): {fmt_time(median(samples))} "
              f"(spread {spread(samples)})")
    ok = crate["engine"] / crate["hf"] >= 0.9 and crate["engine steered"] / crate["hf steered"] >= 0.9
    print(f"\ntargets: tokens/s ≥ 0.9× hf plain and steered (CPU time): {'met' if ok else 'NOT met'}; "
          f"first token ≤ 1 s: "
          f"{'met' if max(firsts) <= 1 else 'NOT met'}; tokens equal: {same}")


if __name__ == "__main__":
    main()
