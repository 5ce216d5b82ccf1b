"""Where a model's parts live and how much memory is left: device maps, offloading, free memory.

A model bigger than one device is sharded by accelerate (``device_map="auto"``, ``max_memory``,
an offload folder): its blocks sit on several GPUs, the CPU or the disk. A disk- or CPU-offloaded
module keeps its parameters on the ``meta`` device and gets them only while it runs, from an
accelerate hook that also knows the device it runs on. Analyses that read weights outside a
forward (the unembedding, DLA's output projections and final norm) go through ``materialized``;
tensors gathered from several layers are moved to one device before they are stacked.

The flag parsers here import neither torch nor accelerate: the CLI checks flags before loading.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_DEVICE = re.compile(r"^(cpu|mps|disk|cuda:[0-9]+|[0-9]+)$")
# Never plan on more than this share of the free memory: other tensors of the same step
# (activations, the allocator's slack, another session) need the rest.
FREE_SHARE = 0.25


class PlacementError(ValueError):
    """A --device-map or --max-memory value that does not parse."""


def parse_size(text: str) -> int:
    """Bytes of a size such as ``20GiB``, ``200MB`` or ``1.5GB`` (MB = 10⁶ B, MiB = 2²⁰ B).

    >>> parse_size("200MB"), parse_size("1GiB")
    (200000000, 1073741824)
    """
    m = _SIZE.match(text)
    if not m or m.group(2).upper() not in _UNITS:
        raise PlacementError(f"{text!r} is not a size: write e.g. 20GiB, 500MB or 1.5GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_max_memory(text: str) -> dict[int | str, int]:
    """``cuda:0=20GiB,cpu=60GiB`` as accelerate's ``max_memory`` ({0: bytes, "cpu": bytes}).

    Devices: ``cuda:N`` (or just ``N``), ``cpu``, ``mps``. Sizes: see ``parse_size``.

    >>> parse_max_memory("cuda:0=20GiB, cpu=200MB")
    {0: 21474836480, 'cpu': 200000000}
    """
    out: dict[int | str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        device, sep, size = part.partition("=")
        device = device.strip().lower()
        if not sep or not _DEVICE.match(device) or device == "disk":
            raise PlacementError(f"--max-memory entry {part!r}: write DEVICE=SIZE with DEVICE cuda:N, cpu "
                                 "or mps, e.g. cuda:0=20GiB,cpu=60GiB")
        key: int | str = int(device.removeprefix("cuda:")) if device[0].isdigit() or device.startswith("cuda:") \
            else device
        if key in out:
            raise PlacementError(f"--max-memory names {device} twice")
        out[key] = parse_size(size)
    if not out:
        raise PlacementError("--max-memory is empty: write e.g. cuda:0=20GiB,cpu=60GiB")
    return out


def check_device_map(value: str | dict | None) -> str | dict | None:
    """A ``--device-map`` strategy (None: the whole model on one device), or an explicit
    {module path: device} map as accelerate takes it (from Python only)."""
    if value is None or isinstance(value, dict) or value in DEVICE_MAPS:
        return value
    raise PlacementError(f"unknown device map {value!r} (use {', '.join(DEVICE_MAPS)})")


# ------------------------------------------------------------------------------ memory
def free_memory(device: str | torch.device = "cpu") -> int:
    """Bytes that new tensors on ``device`` can still take (a best estimate).

    CUDA: the driver's free memory plus what torch's allocator holds but does not use. MPS: the
    recommended working set minus what is allocated. CPU: ``MemAvailable`` of /proc/meminfo
    (psutil where there is no /proc), at most the cgroup's limit minus its usage.
    """
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        free, _ = torch.cuda.mem_get_info(index)
        return int(free + torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index))
    if dev.type == "mps":
        try:
            return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
        except (AttributeError, RuntimeError):
            pass
    return _free_host_memory()


def _free_host_memory() -> int:
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if free is None:
        try:
            import psutil

            free = int(psutil.virtual_memory().available)
        except ImportError:
            free = 4 * 2**30  # nothing to ask: assume a modest machine
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = open(limit_file).read().strip()
            usage = int(open(usage_file).read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            free = min(free, max(0, int(limit) - usage))
        break
    return free


def memory_budget(device: str | torch.device, cap: int | None = None, share: float = FREE_SHARE) -> int:
    """Bytes one step of an analysis may plan on: ``share`` of the free memory, at most ``cap``.

    Set ``EXPLORER_MEMORY_BUDGET`` (a size, e.g. ``512MiB``) to fix it instead.
    """
    fixed = os.environ.get("EXPLORER_MEMORY_BUDGET")
    if fixed:
        return parse_size(fixed)
    budget = int(free_memory(device) * share)
    return budget if cap is None else min(budget, cap)


# ------------------------------------------------------------------------ devices
def execution_device(module: torch.nn.Module) -> torch.device:
    """The device a module computes on: its accelerate hook's when it has one (offloaded or
    sharded models), else that of its first parameter or buffer that is not on ``meta``."""
    import torch

    hook = getattr(module, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is None and hook is not None:  # a SequentialHook: the first of its hooks that knows
        for h in getattr(hook, "hooks", ()):
            dev = getattr(h, "execution_device", None)
            if dev is not None:
                break
    if dev is not None:
        return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def is_offloaded(module: torch.nn.Module) -> bool:
    """Whether a module's own parameters live off-device (CPU or disk offload) between forwards."""
    hook = getattr(module, "_hf_hook", None)
    return bool(getattr(hook, "offload", False)) or any(
        p.device.type == "meta" for p in module.parameters(recurse=False))


def materialized(module: torch.nn.Module | None) -> Iterator[None]:
    """A context in which an offloaded module's parameters are real tensors on its execution
    device (loaded from the CPU or disk copy, put back to ``meta`` on exit); a no-op for a
    module that holds its weights. Hold the session lock: the forward's hook does the same."""
    if module is None or not is_offloaded(module):
        return nullcontext()
    from accelerate.utils import align_module_device

    return align_module_device(module)


@contextmanager
def all_materialized(modules) -> Iterator[None]:
    """``materialized`` for several modules at once."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        for m in modules:
            stack.enter_context(materialized(m))
        yield
