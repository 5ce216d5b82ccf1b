"""Small helpers shared by the benchmarks: threads, rotating timers, the matmul peak, prompts, tables."""
from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def set_threads(n: int) -> int:
    """Pin torch's intra-op threads (the benchmarks compare methods at the same setting)."""
    torch.set_num_threads(n)
    return torch.get_num_threads()


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads, capability {torch.backends.cpu.get_cpu_capability()}")


def rotate(
    methods: dict[str, Callable[[], object]],
    reps: int,
    warmup: int = 1,
    before: dict[str, Callable[[], None]] | None = None,
    cpu: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Time each method ``reps`` times, rotating the order within every rep.

    Interleaving means a slow spell of a shared machine hits all methods alike; the first method
    of a rep changes from rep to rep. ``before[name]`` runs untimed before each call (e.g.
    clearing a cache). Returns every sample in seconds (wall); report the median. Given a dict,
    ``cpu`` receives each sample's CPU seconds of this process too (all its threads): steadier
    than wall time when other jobs share the cores.
    """
    before = before or {}
    names = list(methods)
    for _ in range(warmup):
        for name in names:
            before.get(name, lambda: None)()
            methods[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            before.get(name, lambda: None)()
            gc.collect()
            start, cpu_start = time.perf_counter(), time.process_time()
            methods[name]()
            times[name].append(time.perf_counter() - start)
            if cpu is not None:
                cpu.setdefault(name, []).append(time.process_time() - cpu_start)
    return times


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def spread(samples: list[float]) -> str:
    """min–max of the samples, for judging how noisy a figure is."""
    return f"{fmt_time(min(samples))}–{fmt_time(max(samples))}"


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def matmul_flops(n: int = 4096, reps: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Achieved FLOP/s of an n×n×n matmul (median of ``reps`` after one warm-up)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        samples.append(time.perf_counter() - start)
    return 2 * n ** 3 / median(samples)


def exact_prompt(tokenizer, text: str, n_tokens: int) -> tuple[str, list[int]]:
    """A piece of ``text`` that tokenises to exactly ``n_tokens`` tokens, decoded and re-encoded alike.

    Cutting token ids and decoding may not re-encode to the same ids at the cut, so this slides
    the window's start over the text's tokens until the round trip is exact.
    """
    ids = tokenizer(text, add_special_tokens=False).input_ids
    for start in range(0, max(1, len(ids) - n_tokens)):
        window = ids[start:start + n_tokens]
        prompt = tokenizer.decode(window)
        again = tokenizer(prompt).input_ids
        if again == window and prompt.strip() == prompt:
            return prompt, window
    raise ValueError(f"no window of the text re-encodes to exactly {n_tokens} tokens")


def table(rows: list[list[str]], headers: list[str]) -> str:
    """A plain fixed-width table."""
    cells = [headers] + rows
    widths = [max(len(str(r[i])) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)
