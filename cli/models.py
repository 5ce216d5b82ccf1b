"""``models``: the models this machine can attach (what the app's model picker offers), from
config.json files only: no model loads and nothing is fetched."""
from __future__ import annotations

from cli import checks
from cli.common import add_json_arg, print_json


def cmd_models(args) -> int:
    from explorer.core.model_catalog import hf_cache_dir, local_models

    choices = local_models(args.dir, hf_cache=args.hf_cache)
    if args.json:
        print_json({"hf_cache": str(args.hf_cache or hf_cache_dir()), "models": [c.to_dict() for c in choices]})
        return 0
    if not choices:
        print("no local models found (name a folder with --dir; `python -m explorer setup` adds the default)")
        return 0
    width = max(len(c.name) for c in choices)
    for c in choices:
        family = c.family or f"unsupported: {c.note}"
        print(f"{c.name:<{width}}  {c.source:<8}  {family:<12}  {c.path}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("models", help="list the local models the app's picker offers",
                       description="List model directories found in the named folders, the project's cache "
                                   "(the embedded default) and the local Hugging Face cache ($HF_HUB_CACHE, "
                                   "else ~/.cache/huggingface/hub), with each one's family or why it is "
                                   "unsupported. Only config.json files are read: nothing loads or downloads.")
    p.add_argument("--dir", action="append", default=[], metavar="FOLDER",
                   type=checks.existing("folder of models", "dir"),
                   help="a model directory or a folder of them to list too (repeatable)")
    p.add_argument("--hf-cache", default=None, metavar="DIR",
                   help="the Hugging Face hub cache to scan (default: $HF_HUB_CACHE or ~/.cache/huggingface/hub)")
    add_json_arg(p, "the list")
    p.set_defaults(fn=cmd_models)
