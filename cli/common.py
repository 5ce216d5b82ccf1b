"""What every command shares: the model arguments, loading a session, --snapshot, JSON output, logging."""
from __future__ import annotations

import argparse
import json
import sys


def log(msg: str) -> None:
    """A progress or status line on stderr (stdout carries the result)."""
    print(msg, file=sys.stderr, flush=True)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="local model directory or a hub id already in the local cache "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    add_device_args(p)
    add_placement_args(p)
    add_remote_args(p)
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model's own Python code to run (off by default)")


def add_placement_args(p: argparse.ArgumentParser) -> None:
    """Sharding and offloading by accelerate, for a model bigger than one device."""
    from cli import checks

    p.add_argument("--device-map", default=None, type=checks.device_map,
                   help="shard the model with accelerate: auto, balanced, sequential (GPUs first, then "
                        "the CPU, then --offload-dir); --device is then ignored")
    p.add_argument("--max-memory", default=None, type=checks.max_memory, metavar="DEV=SIZE,...",
                   help="memory each device may hold with --device-map, e.g. cuda:0=20GiB,cpu=60GiB")
    p.add_argument("--offload-dir", default=None, type=checks.offload_dir, metavar="DIR",
                   help="folder for the weights that fit nowhere else with --device-map (disk offload)")


def add_remote_args(p: argparse.ArgumentParser) -> None:
    """A model that runs on an NDIF server: no weights are loaded here."""
    p.add_argument("--remote", nargs="?", const="ndif", default=None, choices=["ndif", "local"],
                   help="run the model on an NDIF server (the server from --ndif-host or NDIF_HOST, the key "
                        "from NDIF_API_KEY); only its config and tokenizer are read here. '--remote local' "
                        "serialises every trace as for a server and runs it here (checks remote-safety)")
    p.add_argument("--ndif-host", default=None, metavar="URL",
                   help="the NDIF server for --remote, e.g. http://127.0.0.1:8001 (default: NDIF_HOST, "
                        "else nnsight's configured server)")


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="where the model runs (auto: a CUDA GPU, then Apple MPS, then the CPU)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="the model's number format (auto: float32 on CPU, bfloat16 on a GPU)")


def add_json_arg(p: argparse.ArgumentParser, what: str = "the result") -> None:
    p.add_argument("--json", action="store_true", help=f"print {what} as JSON on stdout instead of a table")


def load_session(args):
    from cli.checks import check_placement
    from explorer.core.session import ModelSession

    check_placement(args)
    remote = getattr(args, "remote", None)
    if remote:
        return ModelSession.load(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                                 remote="local" if remote == "local" else True,
                                 ndif_host=getattr(args, "ndif_host", None))
    return ModelSession.load(args.model, device=args.device, dtype=args.dtype,
                             trust_remote_code=args.trust_remote_code,
                             device_map=getattr(args, "device_map", None),
                             max_memory=getattr(args, "max_memory", None),
                             offload_dir=getattr(args, "offload_dir", None))


def add_snapshot_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--snapshot", metavar="FILE", default=None,
                   help="also append the result to this snapshot file (created if missing)")


def maybe_snapshot(args, session, result, label: str) -> None:
    """Append a result to ``--snapshot FILE`` when the command was given one."""
    if getattr(args, "snapshot", None):
        from explorer.persistence.snapshot import append_to_snapshot, model_identity

        append_to_snapshot(args.snapshot, result, label, model_identity(session))
        log(f"appended to {args.snapshot}")


def print_json(data) -> None:
    json.dump(data, sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")
