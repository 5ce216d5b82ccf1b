"""Logit lens benchmark: the project's lens against the fastest plain-PyTorch lens we could write.

    .venv/bin/python benchmarks/lens.py            # the full run (a few minutes on 2 CPU cores)
    .venv/bin/python benchmarks/lens.py --quick    # a smoke run: fewer reps, for tests and CI
    .venv/bin/python benchmarks/lens.py --profile  # also: where the engine's time goes

Both sides compute the same outputs for every (row, position) of the embedded default model
(SmolLM2-135M-Instruct, fp32, CPU): top-10 ids and probabilities, entropy, KL(final ‖ row), the
target's probability and rank. The reference runs on its own plain copy of the model (never
wrapped by nnsight): forward hooks on the embeddings and every block, then all rows × positions
final-normed and unembedded in stacked, chunked matmuls with reductions into reused buffers.
Methods are rotated within every rep; figures are medians after a warm-up. See README.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import exact_prompt, fmt_time, machine_line, matmul_flops, median, rotate, set_threads, spread, table  # noqa: E402

# Where each family keeps the residual-stream sites (independent of explorer/core/adapters.py).
PARTS = {
    "llama": ("model.embed_tokens", "model.layers", "model.norm"),
    "mistral": ("model.embed_tokens", "model.layers", "model.norm"),
    "qwen2": ("model.embed_tokens", "model.layers", "model.norm"),
    "gpt2": ("transformer.drop", "transformer.h", "transformer.ln_f"),
    "gpt_neox": ("gpt_neox.emb_dropout", "gpt_neox.layers", "gpt_neox.final_layer_norm"),
}
TARGET_TOP1 = -1  # target id meaning: the final row's top-1 at the last position


class PlainLens:
    """A logit lens in plain PyTorch on an unwrapped Hugging Face model.

    Rows are stacked position-major, so each chunk holds every row of a few positions and the
    final row's distribution is at hand for KL. Per chunk: one matmul into a reused buffer,
    top-k on the logits, the rank count as a float compare into the second buffer, the logits
    shifted by their max in place, exp into the second buffer, then in-place products and sums:
    sum(e), sum(e·s) for the entropy and, per position, sum(p_final·s_row) for
    KL(final ‖ row) = -H_final - sum(p_final·s_row) + lse_row (s = logits minus the row max).
    """

    def __init__(self, model, tokenizer, chunk_rows: int = 1024):
        embed, blocks, norm = PARTS[model.config.model_type]
        self.model, self.tokenizer = model, tokenizer
        self.norm = model.get_submodule(norm)
        head = model.get_output_embeddings()
        self._heads = {torch.float32: (head.weight, head.bias)}
        self.chunk_rows = chunk_rows
        self._rows: list[torch.Tensor] = []
        keep = lambda _m, _i, out: self._rows.append(out[0] if isinstance(out, tuple) else out)  # noqa: E731
        self._hooks = [model.get_submodule(embed).register_forward_hook(keep)]
        self._hooks += [b.register_forward_hook(keep) for b in model.get_submodule(blocks)]

    def close(self) -> None:
        for h in self._hooks:
            h.remove()

    @torch.no_grad()
    def streams(self, ids: torch.Tensor) -> torch.Tensor:
        """[R, T, d]: the embeddings and every block's output."""
        self._rows.clear()
        self.model(input_ids=ids[None], logits_to_keep=1)
        rows = torch.stack([r[0] for r in self._rows])
        self._rows.clear()
        return rows

    def head(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The unembedding weight and bias in ``dtype`` (cast once, then kept)."""
        if dtype not in self._heads:
            weight, bias = self._heads[torch.float32]
            self._heads[dtype] = (weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype))
        return self._heads[dtype]

    @torch.no_grad()
    def __call__(self, prompt: str, top_k: int = 10, target_id: int = TARGET_TOP1,
                 dtype: torch.dtype = torch.float32, stream: torch.Tensor | None = None) -> dict[str, np.ndarray]:
        if stream is None:
            stream = self.streams(self.tokenizer(prompt, return_tensors="pt").input_ids[0])
        n_rows, n_pos, d = stream.shape
        normed = self.norm(stream.transpose(0, 1).reshape(-1, d))  # [(T·R), d], position-major
        out = reduce_stream(normed, n_rows, *self.head(dtype), top_k, target_id, self.chunk_rows)
        return {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in out.items()}


def _logits(x: torch.Tensor, weight, bias, out: torch.Tensor) -> torch.Tensor:
    x = x.to(weight.dtype)
    if weight.dtype == out.dtype:
        if bias is None:
            return torch.mm(x, weight.t(), out=out)
        return torch.addmm(bias, x, weight.t(), out=out)
    out.copy_(F.linear(x, weight, bias))  # a bf16 matmul; the reductions stay in fp32
    return out


@torch.no_grad()
def reduce_stream(normed: torch.Tensor, n_rows: int, weight, bias, top_k: int, target_id: int,
                  chunk_rows: int) -> dict:
    """Lens outputs [R, T, ...] from final-normed rows stacked position-major [(T·R), d]."""
    n_pos = normed.shape[0] // n_rows
    if target_id == TARGET_TOP1:
        target_id = int(F.linear(normed[-1:].to(weight.dtype), weight, bias).argmax())
    per_chunk = max(1, chunk_rows // n_rows)  # positions per chunk
    z_buf = torch.empty(min(per_chunk, n_pos) * n_rows, weight.shape[0])
    e_buf = torch.empty_like(z_buf)
    out = {k: [] for k in ("top_ids", "top_probs", "entropy", "kl_to_final", "target_probs", "target_ranks")}
    for start in range(0, n_pos, per_chunk):
        x = normed[start * n_rows:(start + per_chunk) * n_rows]
        n, p = x.shape[0], x.shape[0] // n_rows
        z, e = _logits(x, weight, bias, z_buf[:n]), e_buf[:n]
        top_z, top_ids = torch.topk(z, top_k, dim=-1)
        t_z = z[:, target_id].clone()
        torch.gt(z, t_z[:, None], out=e)                   # a float compare into the spare buffer:
        rank = e.sum(-1).long() + 1                        # summing a bool tensor is ~9× slower
        m = top_z[:, :1]
        z.sub_(m)                                          # s = z - max ≤ 0
        torch.exp(z, out=e)
        sum_e = e.sum(-1)
        lse = sum_e.log()                                  # log-sum-exp of s
        e_final = e.view(p, n_rows, -1)[:, -1].clone()     # the final row's exp, per position
        sum_es = e.mul_(z).sum(-1)                         # Σ e·s: elementwise, then a cascade sum
        entropy = lse - sum_es / sum_e                     # (bmm's dot products lose ~2e-5 here)
        cross = z.view(p, n_rows, -1).mul_(e_final[:, None]).sum(-1) / sum_e.view(p, n_rows)[:, -1:]
        kl = lse.view(p, n_rows) - cross - entropy.view(p, n_rows)[:, -1:]
        out["top_ids"].append(top_ids.view(p, n_rows, top_k))
        out["top_probs"].append((top_z - m - lse[:, None]).exp().view(p, n_rows, top_k))
        out["entropy"].append(entropy.view(p, n_rows))
        out["kl_to_final"].append(kl.clamp_min(0))
        out["target_probs"].append((t_z - m[:, 0] - lse).exp().view(p, n_rows))
        out["target_ranks"].append(rank.view(p, n_rows))
    result = {k: torch.cat(v).transpose(0, 1) for k, v in out.items()}  # [R, T, ...]
    result["target_id"] = target_id
    return result


def proposed_reduce_rows(session, stream: torch.Tensor, top_k: int, target_id: int, dtype: torch.dtype,
                         chunk_rows: int = 1024) -> dict[str, np.ndarray]:
    """The reference's reductions behind the engine's ``reduce_rows`` signature (for --profile).

    Shows what the engine would gain from reused buffers, a float rank count and in-place
    products; it is patched into ``explorer.analyses.lens`` only inside this benchmark process.
    """
    n_rows, n_pos, d = stream.shape
    with torch.no_grad():
        normed = session.final_norm(stream.transpose(0, 1).reshape(-1, d))
    weight, bias = session.unembed_weight(dtype), session.unembed_bias()
    bias = None if bias is None else bias.to(weight.dtype)
    out = reduce_stream(normed, n_rows, weight, bias, top_k, target_id, chunk_rows)
    return {
        "top_ids": out["top_ids"].numpy().astype(np.int64),
        "top_probs": out["top_probs"].numpy().astype(np.float32),
        "entropy": out["entropy"].numpy().astype(np.float32),
        "kl_to_final": out["kl_to_final"].numpy().astype(np.float32),
        "target_probs": out["target_probs"].numpy().astype(np.float32),
        "target_ranks": out["target_ranks"].numpy().astype(np.int64),
    }


def float64_truth(plain: PlainLens, prompt: str, target_id: int, top_k: int = 10) -> dict[str, np.ndarray]:
    """Reductions in float64 of the float32 lens logits (only for short prompts: memory)."""
    ids = plain.tokenizer(prompt, return_tensors="pt").input_ids[0]
    with torch.no_grad():
        stream = plain.streams(ids)
        z = F.linear(plain.norm(stream), *plain.head(torch.float32)).double()
    lp = torch.log_softmax(z, -1)
    p = lp.exp()
    top_lp, top_ids = torch.topk(lp, top_k, -1)
    return {"top_ids": top_ids.numpy(), "top_probs": top_lp.exp().numpy(), "entropy": (-(p * lp).sum(-1)).numpy(),
            "kl_to_final": (p[-1] * (lp[-1] - lp)).sum(-1).numpy(), "target_probs": lp[..., target_id].exp().numpy()}


def differences(a, b) -> dict[str, float]:
    """Largest disagreements between two lens outputs (a: LensResult or dict; b: dict)."""
    get = (lambda k: getattr(a, k)) if not isinstance(a, dict) else a.__getitem__
    out = {
        "top-k ids equal": float((get("top_ids") == b["top_ids"]).mean()),
        "max |Δ top prob|": float(np.abs(get("top_probs") - b["top_probs"]).max()),
        "max |Δ entropy|": float(np.abs(get("entropy") - b["entropy"]).max()),
        "max rel Δ KL": float((np.abs(get("kl_to_final") - b["kl_to_final"]) / np.maximum(b["kl_to_final"], 1e-3)).max()),
        "max |Δ target prob|": float(np.abs(get("target_probs") - b["target_probs"]).max()),
    }
    if "target_ranks" in b:
        out["ranks equal"] = float((get("target_ranks") == b["target_ranks"]).mean())
    return out


def useful_flops(model, n_tokens: int, n_rows: int) -> float:
    """2·P_block·T + 4·T²·d·L + 2·d·V·rows (performance-and-nnsight.md §4)."""
    cfg = model.config
    _, blocks, _ = PARTS[cfg.model_type]
    layers = model.get_submodule(blocks)
    p_block = sum(m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear))
    d, n_layers = cfg.hidden_size, len(layers)
    vocab = model.get_output_embeddings().weight.shape[0]
    return 2 * p_block * n_tokens + 4 * n_tokens ** 2 * d * n_layers + 2 * d * vocab * n_rows * n_tokens


def load(threads: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from explorer.core.defaults import default_corpus_path, ensure_default_model
    from explorer.core.session import ModelSession

    set_threads(threads)
    path = ensure_default_model()
    session = ModelSession.load(str(path), device="cpu", dtype="float32")
    plain = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True).eval()
    plain.config.use_cache = False
    for p in plain.parameters():
        p.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    corpus = default_corpus_path()
    text = corpus.read_text() if corpus.exists() else (torch.__doc__ or "") * 20
    return session, plain, tokenizer, text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 16 tokens, 2 reps (about half a minute on an idle 2-core box)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="prompt lengths (default 16 128)")
    parser.add_argument("--chunk-rows", type=int, default=1024, help="rows per unembedding chunk (reference)")
    parser.add_argument("--profile", action="store_true",
                        help="also split the engine's time, sweep its CHUNK_ROWS and try the proposed reductions")
    args = parser.parse_args(argv)
    reps = 2 if args.quick else args.reps
    lengths = args.lengths or ([16] if args.quick else [16, 128])

    from explorer.analyses.lens import LensRequest, logit_lens

    session, plain_model, tokenizer, text = load(args.threads)
    plain = PlainLens(plain_model, tokenizer, chunk_rows=args.chunk_rows)
    print(f"Logit lens benchmark: {session.name}, fp32 weights, CPU")
    print(machine_line())
    peak = matmul_flops(4096, reps=2 if args.quick else 5)
    unembed = _unembed_flops(plain, rows=992, reps=2 if args.quick else 5)
    print(f"fp32 4096×4096 matmul: {peak / 1e9:.0f} GFLOP/s (the peak the lens is measured against); "
          f"unembedding matmul [992×576]·[576×49152]: {unembed / 1e9:.0f} GFLOP/s ({unembed / peak:.0%})\n")

    summary: list[list[str]] = []
    for n_tokens in lengths:
        prompt, ids = exact_prompt(tokenizer, text, n_tokens)
        assert session.encode(prompt).tolist() == ids
        request = LensRequest(prompt, top_k=10)
        bf16_request = LensRequest(prompt, top_k=10, unembed_dtype="bfloat16")

        # Correctness first: the two sides agree (and, for short prompts, both against float64).
        session.clear_cache()
        ours = logit_lens(session, request)
        ref = plain(prompt)
        assert ref["target_id"] == ours.target_id
        diffs = differences(ours, ref)
        print(f"T={n_tokens} engine vs reference: " + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))
        if n_tokens <= 32:
            truth = float64_truth(plain, prompt, ours.target_id)
            for name, got in (("engine", ours), ("reference", ref)):
                d = differences(got, truth)
                print(f"T={n_tokens} {name} vs float64: " + ", ".join(f"{k} {v:.3g}" for k, v in d.items()))
        assert diffs["top-k ids equal"] > 0.999 and diffs["max |Δ top prob|"] < 1e-4, "the two lenses disagree"

        methods = {
            "engine": lambda: logit_lens(session, request),
            "reference": lambda: plain(prompt),
            "engine bf16": lambda: logit_lens(session, bf16_request),
            "reference bf16": lambda: plain(prompt, dtype=torch.bfloat16),
            "forward": lambda: plain.streams(torch.tensor(ids)),
        }
        clear = session.clear_cache
        times = rotate(methods, reps=reps, warmup=1, before={"engine": clear, "engine bf16": clear})
        med = {k: median(v) for k, v in times.items()}
        ratio = median([a / b for a, b in zip(times["engine"], times["reference"])])  # within each rep
        ratio_bf16 = median([a / b for a, b in zip(times["engine bf16"], times["reference bf16"])])

        bf16 = logit_lens(session, bf16_request)
        agreement = float((bf16.top_ids[..., 0] == ours.top_ids[..., 0]).mean())
        cache_times = rotate({"hit": lambda: logit_lens(session, request)}, reps=50 if args.quick else 200)["hit"]

        n_rows = ours.n_rows
        flops = useful_flops(plain_model, n_tokens, n_rows)
        of_peak = lambda t: f"{flops / t / 1e9:.0f} GFLOP/s, {flops / t / peak:.0%}"  # noqa: E731
        rows = [
            ["engine: logit_lens, cache cleared", fmt_time(med["engine"]), spread(times["engine"]),
             f"{ratio:.2f}×", of_peak(med["engine"])],
            ["plain-PyTorch reference", fmt_time(med["reference"]), spread(times["reference"]), "1.00×",
             of_peak(med["reference"])],
            ["engine, bfloat16 unembedding", fmt_time(med["engine bf16"]), spread(times["engine bf16"]),
             f"{ratio_bf16:.2f}× ref bf16", f"top-1 = fp32 top-1 in {agreement:.1%} of cells"],
            ["reference, bfloat16 unembedding", fmt_time(med["reference bf16"]), spread(times["reference bf16"]),
             "", ""],
            ["plain forward with hooks (no unembedding)", fmt_time(med["forward"]), spread(times["forward"]), "", ""],
            ["engine, repeated request (cache hit)", fmt_time(median(cache_times)), spread(cache_times), "", ""],
        ]
        print(f"\nT={n_tokens} tokens: {n_rows} rows × {n_tokens} positions, {reps} reps, "
              f"useful work {flops / 1e9:.1f} GFLOP")
        print(table(rows, ["method", "median", "min–max", "engine/ref", "achieved / note"]))
        print()
        summary.append([str(n_tokens), fmt_time(med["engine"]), fmt_time(med["reference"]), f"{ratio:.2f}×",
                        f"{flops / med['engine'] / peak:.0%}", fmt_time(med["engine bf16"]), f"{agreement:.1%}",
                        fmt_time(median(cache_times))])

    print("Summary (targets: engine/ref ≤ 1.10×; ≥ 70% of the fp32 matmul peak at 128 tokens; cache hit ≤ 20 ms)")
    print(table(summary, ["tokens", "engine", "reference", "engine/ref", "of peak", "engine bf16",
                          "bf16 top-1", "cache hit"]))

    if args.profile:
        profile(session, plain, tokenizer, text, max(lengths), reps)
    plain.close()
    return 0


def _unembed_flops(plain: PlainLens, rows: int, reps: int) -> float:
    weight, _ = plain.head(torch.float32)
    x = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(0))
    out = torch.empty(rows, weight.shape[0])
    times = rotate({"mm": lambda: torch.mm(x, weight.t(), out=out)}, reps=reps)["mm"]
    return 2 * rows * weight.shape[0] * weight.shape[1] / median(times)


def profile(session, plain: PlainLens, tokenizer, text: str, n_tokens: int, reps: int) -> None:
    """Where the engine's time goes: the trace vs the reduction, CHUNK_ROWS, a proposed reduction."""
    from explorer.analyses import lens as engine
    from explorer.analyses.lens import LensRequest, logit_lens

    prompt, ids = exact_prompt(tokenizer, text, n_tokens)
    ids_t = torch.tensor(ids)
    (stream,) = engine.residual_streams(session, [ids_t])
    target = int(engine.final_top1(session, stream, torch.float32))
    assert torch.equal(stream, plain.streams(ids_t)), "the engine's trace and the hooks see different streams"
    f32 = torch.float32

    print(f"\nProfile at T={n_tokens} ({reps} reps, rotated)")
    times = rotate({
        "engine trace (residual_streams)": lambda: engine.residual_streams(session, [ids_t]),
        "plain forward with hooks": lambda: plain.streams(ids_t),
        f"engine reduce_rows (CHUNK_ROWS={engine.CHUNK_ROWS})": lambda: engine.reduce_rows(session, stream, 10, target, f32),
        "reference reductions (same stream)": lambda: plain("", target_id=target, stream=stream),
        "proposed reduce_rows (reference's reductions)": lambda: proposed_reduce_rows(session, stream, 10, target, f32),
    }, reps=reps)
    print(table([[k, fmt_time(median(v)), spread(v)] for k, v in times.items()], ["part", "median", "min–max"]))

    original = engine.CHUNK_ROWS
    sweep_times = {}
    try:
        for chunk in (256, 512, 1024, 2048):  # one setting at a time: the module constant is global
            engine.CHUNK_ROWS = chunk
            run = lambda: engine.reduce_rows(session, stream, 10, target, f32)  # noqa: E731
            sweep_times[chunk] = median(rotate({"r": run}, reps=max(2, reps // 2))["r"])
    finally:
        engine.CHUNK_ROWS = original
    print("engine reduce_rows by CHUNK_ROWS: " + ", ".join(f"{k}: {fmt_time(v)}" for k, v in sweep_times.items()))
    saved, ref_times = plain.chunk_rows, {}
    try:
        for chunk in (62, 124, 248, 496, 1024, 2048):
            plain.chunk_rows = chunk
            run = lambda: plain("", target_id=target, stream=stream)  # noqa: E731
            ref_times[chunk] = median(rotate({"r": run}, reps=max(2, reps // 2))["r"])
    finally:
        plain.chunk_rows = saved
    print("reference reductions by chunk rows: " + ", ".join(f"{k}: {fmt_time(v)}" for k, v in ref_times.items()))

    # End to end: the engine with the proposed reductions patched in, against the reference.
    request = LensRequest(prompt, top_k=10)
    expected = logit_lens(session, request)
    session.clear_cache()
    original_reduce = engine.reduce_rows
    engine.reduce_rows = proposed_reduce_rows
    try:
        patched = logit_lens(session, request)
        d = differences(patched, {k: getattr(expected, k) for k in
                                  ("top_ids", "top_probs", "entropy", "kl_to_final", "target_probs", "target_ranks")})
        print("proposed vs current engine outputs: " + ", ".join(f"{k} {v:.3g}" for k, v in d.items()))
        e2e = rotate({"engine, proposed reduce_rows": lambda: logit_lens(session, request),
                      "reference": lambda: plain(prompt)},
                     reps=reps, before={"engine, proposed reduce_rows": session.clear_cache})
    finally:
        engine.reduce_rows = original_reduce
        session.clear_cache()
    ratio = median([a / b for a, b in zip(e2e["engine, proposed reduce_rows"], e2e["reference"])])
    print(table([[k, fmt_time(median(v)), spread(v)] for k, v in e2e.items()], ["end to end", "median", "min–max"]))
    print(f"engine with the proposed reduce_rows / reference: {ratio:.2f}×")

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.reduce_rows(session, stream, 10, target, f32)
    print("\nengine reduce_rows by operator (torch.profiler, one call):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    t0 = time.perf_counter()
    code = main()
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    sys.exit(code)
