"""Real layer shapes: time and peak memory of the analyses on random-weight models of big models' shapes.

    .venv/bin/python benchmarks/scale.py                          # Llama-3-8B and Qwen2-7B shapes, 2 blocks
    .venv/bin/python benchmarks/scale.py --shapes llama3-8b --tasks lens,heads --reps 1
    .venv/bin/python benchmarks/scale.py --device cuda --dtype bfloat16     # on a GPU (see gpu_check.py)

Each model has a real model's layer shapes (hidden size, MLP width, heads, KV heads, head size,
vocabulary, untied unembedding) but only ``--blocks`` blocks, with random weights: the embeddings
and the unembedding, which dominate a 2-block model's weights, are full size, so the vocabulary-
sized work (the lens over 128k-256k tokens, the index's state for 14k-19k neurons a layer) is
the real one. Every (shape, task, side) runs in its own child process, so each peak RSS
(``VmHWM``, reset after the model is built) is that task's alone; the table puts the model's own
weight bytes beside each peak. Targets (issue 16): peak RSS ≤ weights + 1.5 GiB for the lens and
heads, ≤ weights + 3 GiB for the index.

Tasks, engine against a plain-transformers reference doing the same model work:
- lens: the logit lens of 128 tokens (every row and position, top-10, entropy, KL, target) vs
  ``benchmarks/lens.py``'s plain-PyTorch lens;
- heads: head scores + DLA of a 64-token prompt (and the repeated random tokens) vs plain eager
  forwards with ``output_attentions=True``;
- sweep: the exact all-head zero-ablation sweep of a 16-token prompt vs one plain forward per head;
- index: a neuron index of ``--index-tokens`` tokens (windows of 64, 16 a batch) vs bare forwards
  over the same windows.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from common import exact_prompt, fmt_time, machine_line, median, set_threads, table  # noqa: E402

TASKS = ("lens", "heads", "sweep", "index")
TARGETS = {"lens": 1.5, "heads": 1.5, "sweep": None, "index": 3.0}  # GiB above the weights
# Real models' layer shapes (from their config.json files).
SHAPES = {
    "smoke": ("llama", dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                            vocab_size=49152, max_position_embeddings=2048)),  # a quick check of the script
    "llama3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                                max_position_embeddings=8192, rms_norm_eps=1e-5)),
    "qwen2-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                               num_key_value_heads=4, vocab_size=152064, rope_theta=1e6,
                               max_position_embeddings=32768, rms_norm_eps=1e-6)),
    "mistral-7b": ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                   num_key_value_heads=8, vocab_size=32768, rope_theta=1e6,
                                   max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=None)),
    # Llama-3-8B's 458,752 neurons (32 blocks × 14,336) on a narrow residual stream: the index's
    # state at full size (it depends on blocks × MLP width only), in 1.7 GB of float32 weights.
    "llama3-8b-neurons": ("llama", dict(num_hidden_layers=32, hidden_size=256, intermediate_size=14336,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                                        vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                                        rms_norm_eps=1e-5)),
    "gemma2-9b": ("gemma2", dict(hidden_size=3584, intermediate_size=14336, num_attention_heads=16,
                                 num_key_value_heads=8, head_dim=256, vocab_size=256000,
                                 max_position_embeddings=8192, rms_norm_eps=1e-6, query_pre_attn_scalar=256,
                                 final_logit_softcapping=30.0, attn_logit_softcapping=50.0, sliding_window=4096)),
}
GiB = 2**30


# ------------------------------------------------------------------------------ memory
def _status_kib(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------ the model
def random_model(shape: str, blocks: int, dtype: torch.dtype, device: str):
    """A causal LM of ``shape``'s layer shapes with ``blocks`` blocks and random weights, built
    without a second copy (parameters created empty on the target device, then filled in place)."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM

    family, sizes = SHAPES[shape]
    sizes = {"num_hidden_layers": blocks, **sizes}  # a shape may fix its own number of blocks
    config = AutoConfig.for_model(family, tie_word_embeddings=False, **sizes)
    config.use_cache = False
    with init_empty_weights():  # parameters on meta; buffers (rotary frequencies) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    for name, param in list(model.named_parameters()):
        value = torch.empty(param.shape, dtype=dtype, device=device)
        if name.endswith("norm.weight") or "layernorm" in name:
            value.fill_(0.0 if family == "gemma2" else 1.0)  # Gemma's norms scale by (1 + w)
        elif name.endswith("bias"):
            value.zero_()
        else:
            value.normal_(0.0, 0.02, generator=gen)
        set_module_tensor_to_device(model, name, device, value=value)
    model.to(device)  # the buffers
    return model.eval()


def default_model(dtype: torch.dtype, device: str):
    """The embedded default model (real weights), for the GPU check's ratios."""
    from transformers import AutoModelForCausalLM

    from explorer.core.defaults import ensure_default_model

    model = AutoModelForCausalLM.from_pretrained(str(ensure_default_model(progress=lambda *_: None)), dtype=dtype,
                                                 local_files_only=True)
    model.config.use_cache = False
    return model.to(device).eval()


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ------------------------------------------------------------------------------ tasks
def prompts(tokenizer) -> dict[str, str]:
    from explorer.core.defaults import ensure_default_corpus

    text = ensure_default_corpus(progress=lambda *_: None).read_text(encoding="utf-8")[:20000]
    return {n: exact_prompt(tokenizer, text, n)[0] for n in (16, 64, 128)}


def engine_task(task: str, session, texts: dict, args, work: Path):
    from explorer.analyses.heads import HeadsRequest, head_scores
    from explorer.analyses.lens import logit_lens
    from explorer.interventions.ablation import sweep
    from explorer.neurons.index import IndexRequest, build_index

    session.clear_cache()
    if task == "lens":
        return lambda: logit_lens(session, texts[128], top_k=10)
    if task == "heads":
        return lambda: head_scores(session, HeadsRequest(texts[64], seq_len=24, seed=0))
    if task == "sweep":
        return lambda: sweep(session, texts[16], target="#1000", kind="heads")
    corpus = work / "corpus.txt"
    _corpus(corpus, args.index_tokens)
    runs = iter(range(10**6))

    def index():
        return build_index(session, IndexRequest(corpus_path=str(corpus), max_tokens=args.index_tokens, window=64,
                                                 batch_windows=16, checkpoint_seconds=1e9),
                           out_dir=work / f"index-{next(runs)}")
    return index


def _corpus(path: Path, n_tokens: int) -> None:
    from neurons import synthetic_corpus

    synthetic_corpus(path, n_tokens)


def reference_task(task: str, model, tokenizer, texts: dict, args, work: Path):
    """The same model work in plain transformers: no nnsight, no engine."""
    device = args.device
    if task == "lens":
        from lens import PARTS, PlainLens

        # Gemma 2 names its parts as Llama does. The plain lens reads the embedding before Gemma's
        # √d scaling and skips the final soft-capping (one tanh per logit): the same matmuls and
        # reductions, so a time and memory reference, not a check of the values.
        PARTS.setdefault("gemma2", PARTS["llama"])
        plain = PlainLens(model, tokenizer)

        def lens():
            with torch.device(device):  # PlainLens allocates its buffers on the default device
                return plain(texts[128], top_k=10)
        return lens
    if task == "heads":
        model.set_attn_implementation("eager")
        prompt = tokenizer(texts[64], return_tensors="pt").input_ids.to(device)
        gen = torch.Generator().manual_seed(0)
        rand = torch.randint(100, 40000, (24,), generator=gen)
        repeated = torch.cat([torch.tensor([tokenizer.bos_token_id or 0]), rand, rand])[None].to(device)

        def heads():
            with torch.no_grad():
                a = model(input_ids=prompt, output_attentions=True, logits_to_keep=1).attentions
                b = model(input_ids=repeated, output_attentions=True, logits_to_keep=1).attentions
            return len(a) + len(b)
        return heads
    if task == "sweep":
        from sweep import reference_sweep

        ids = tokenizer(texts[16], return_tensors="pt").input_ids[0].to(device)
        cfg = model.config
        d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        heads = [(layer, h) for layer in range(cfg.num_hidden_layers) for h in range(cfg.num_attention_heads)]
        return lambda: reference_sweep(model, ids, 1000, heads, d_head)
    n_windows = args.index_tokens // 64
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(100, 40000, (n_windows, 64), generator=gen)

    def forwards():
        with torch.no_grad():
            for start in range(0, n_windows, 16):
                model(input_ids=windows[start:start + 16].to(device), logits_to_keep=1)
    return forwards


def child(args) -> None:
    """One (shape, task, side) in this process; prints a RESULT line."""
    from transformers import AutoTokenizer

    from explorer.core.defaults import ensure_default_model
    from explorer.core.session import DTYPES, ModelSession

    if args.threads:
        set_threads(args.threads)
    shape, task, side = args.child
    dtype = DTYPES[args.dtype]
    tokenizer = AutoTokenizer.from_pretrained(str(ensure_default_model(progress=lambda *_: None)))
    texts = prompts(tokenizer)
    base_rss = _status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    model = default_model(dtype, args.device) if shape == "default" else random_model(shape, args.blocks, dtype,
                                                                                     args.device)
    build = time.perf_counter() - t0
    work = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    cuda = args.device.startswith("cuda")
    try:
        if side == "engine":
            session = ModelSession(model, tokenizer, name=f"random-{shape}-{args.blocks}")
            run = engine_task(task, session, texts, args, work)
        else:
            run = reference_task(task, model, tokenizer, texts, args, work)
        loaded = _status_kib("VmRSS") * 1024
        peak_reset = reset_peak()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(0 if task == "index" else args.warmup):  # first-call costs (vocabulary strings,
            if side == "engine":                                  # trace setup) are not the shape's
                session.clear_cache()
            run()
        samples = []
        for _ in range(args.reps):
            if side == "engine" and task != "index":
                session.clear_cache()
            start = time.perf_counter()
            run()
            if cuda:
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - start)
        out = {"shape": shape, "task": task, "side": side, "seconds": samples, "build_seconds": build,
               "weights": weight_bytes(model), "base_rss": base_rss, "loaded_rss": loaded,
               "peak_rss": _status_kib("VmHWM") * 1024, "peak_reset": peak_reset,
               "gpu_peak": torch.cuda.max_memory_allocated() if cuda else None}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("RESULT " + json.dumps(out), flush=True)


def run_child(args, shape: str, task: str, side: str) -> dict:
    cmd = [sys.executable, __file__, "--child", shape, task, side, "--blocks", str(args.blocks),
           "--dtype", args.dtype, "--device", args.device, "--reps", str(args.reps),
           "--index-tokens", str(args.index_tokens), "--warmup", str(args.warmup)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"shape": shape, "task": task, "side": side, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(lines[-1][len("RESULT "):])


def gib(n: float | None) -> str:
    return "—" if n is None else f"{n / GiB:.2f} GiB"


def rows_for(results: list[dict]) -> list[list[str]]:
    by = {(r["shape"], r["task"], r["side"]): r for r in results}
    rows = []
    for (shape, task, side), r in by.items():
        if side != "engine":
            continue
        ref = by.get((shape, task, "reference"), {})
        if "error" in r:
            rows.append([shape, task, "error: " + " ".join(r["error"])] + [""] * 8)
            continue
        t, w = median(r["seconds"]), r["weights"]
        rt = median(ref["seconds"]) if ref.get("seconds") else None
        over = r["peak_rss"] - w
        target = TARGETS[task]
        rows.append([shape, task, gib(w), fmt_time(t), fmt_time(rt) if rt else "—",
                     f"{t / rt:.2f}×" if rt else "—", gib(r["peak_rss"]), gib(over),
                     "—" if target is None else (f"≤ {target} GiB: " + ("met" if over <= target * GiB else "NOT met")),
                     gib(ref.get("peak_rss")) if ref.get("peak_rss") else "—"])
    return rows


HEADERS = ["shape", "task", "weights", "engine", "reference", "ratio", "peak RSS", "peak − weights", "target",
           "ref. peak RSS"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--shapes", default="llama3-8b,qwen2-7b",
                    help=f"comma-separated, of {', '.join(SHAPES)}, default (the embedded model, real weights)")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    ap.add_argument("--blocks", type=int, default=2, help="blocks per model (default 2)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=1, help="timed runs per task (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones (not for the index)")
    ap.add_argument("--index-tokens", type=int, default=16384, help="tokens the neuron index reads")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-reference", action="store_true", help="engine only")
    ap.add_argument("--json", default=None, help="also write every result to this file")
    ap.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0
    shapes = [s for s in args.shapes.split(",") if s]
    tasks = [t for t in args.tasks.split(",") if t]
    for name, known in (("shape", [*SHAPES, "default"]), ("task", TASKS)):
        bad = [x for x in (shapes if name == "shape" else tasks) if x not in known]
        if bad:
            ap.error(f"unknown {name} {bad[0]!r}")
    print(machine_line())
    print(f"{args.blocks} blocks, {args.dtype} on {args.device}, {args.reps} rep(s), index of {args.index_tokens} "
          "tokens; one child process per line and side")
    results = []
    for shape in shapes:
        for task in tasks:
            for side in ("engine",) + (() if args.no_reference else ("reference",)):
                r = run_child(args, shape, task, side)
                results.append(r)
                note = r.get("error") or f"{fmt_time(median(r['seconds']))}, peak {gib(r['peak_rss'])}"
                print(f"  {shape} {task} {side}: {note}", flush=True)
    print()
    print(table(rows_for(results), HEADERS))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
