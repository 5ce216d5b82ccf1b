"""Training a TopK or BatchTopK sparse autoencoder (or transcoder) on one site of the attached
model: a resumable job.

Data. The corpus (``corpus_path``: a path, None for the default news corpus, ``large`` for the
State of the Union + Moby-Dick corpus of ``explorer.features.corpora``) is cut into windows of
``window`` tokens (``explorer.core.corpus.token_windows``). The first ``eval_windows`` windows are
held out for evaluation; training reads the next ones in order, ``batch_windows`` per forward
pass, the pass stopped right after the site (``explorer.features.harvest``). The first
``skip_first`` positions of every window are left out (a window's first token carries the
attention-sink activations, an order of magnitude larger than the rest at mid layers of
SmolLM2). A forward pass's activation vectors are shuffled (seeded by the pass's number) and
cut into optimizer steps of ``batch`` vectors; nothing but the current pass is held in memory.

Model. A TopK SAE (``explorer.features.sae``, architecture ``topk``, ``apply_b_dec_to_input``):
decoder rows random unit vectors, encoder = decoder transposed, ``b_enc`` 0, ``b_dec`` the mean
of the first pass's activations (Gao et al. 2024; EleutherAI's sparsify). The loss is the
fraction of variance unexplained, FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² over the step's vectors, plus
``aux_coef`` × the AuxK loss (the top ``aux_k`` (d_in/2) dead latents reconstructing the error,
scaled down while fewer latents are dead). Adam, ``lr`` (None: 5e-4 / √(width / 2¹⁴), 2.5× the
rule of EleutherAI's sparsify, which assumes far longer runs: at width 4,608, k 32 on SmolLM2's
layer 12, 120 steps of 1,024 vectors reached a held-out FVU of 0.33 at lr 1e-3 and 0.42 at
sparsify's 3.8e-4) after a linear warm-up of ``warmup_steps``; decoder rows are kept at unit
norm (their gradient's radial part removed, then renormalised after each step). The decoding of k active latents is an
``embedding_bag`` over their decoder rows (k·d_in per vector instead of width·d_in).

BatchTopK (``architecture="batchtopk"``; Bussmann et al. 2024): a step keeps the k·B largest
pre-activations of its B vectors across the whole batch (through a ReLU), so a vector may use
more or fewer than k latents, k on average. Inference cannot see a batch; it keeps h > θ, one
threshold θ calibrated after every forward pass on that pass's N vectors with the weights as they
now are: the (k·N+1)-th largest pre-activation (0 if fewer are positive), so that mean L0 is k
there. Why not the running average of each step's smallest kept activation (θ ← 0.99·θ +
0.01·min; Bussmann et al., SAELens): it lags the weights by ~100 steps; on SmolLM2's layer 12
(width 4,608, k 32, 64 steps) it gave a held-out L0 of 10.8 on the residual stream and 64.5 on
a transcoder. Calibrating costs one encoder product per pass and keeps nothing beyond the pass;
a single scalar fitted on ~4k training vectors, it leaves the held-out L0 an honest check (near
k, not exactly k; same model and layer, 32 steps, same weights: residual L0 34.6 vs 10.7 with
the running average, held-out FVU 0.63 vs 0.80, Δ loss 2.35 vs 4.87; transcoder L0 33.7 vs
7.4). The SAE is saved and evaluated as what it is at inference, a JumpReLU with every latent's
threshold θ (SAELens's ``jumprelu``; SAELens saves its own BatchTopK SAEs the same way), so
SAELens, Neuronpedia tooling and this app all encode it alike; ``metadata.explorer`` records
``architecture: batchtopk``, ``k`` and ``threshold: pass-calibrated``.
A BatchTopK SAE (not transcoder) reads each vector scaled to norm √d_in (SAELens's
``constant_norm_rescale``, saved in its ``cfg.json``, so SAELens and this app undo it on decoding):
selecting across the batch, the residual stream's few vectors of 10–100× the typical norm would
otherwise take most of the k·B activations (on SmolLM2's layer 12, width 4,608, k 32, 65k tokens:
training FVU 3.6 → 3.8 unscaled). FVU and Δ loss are measured on the unscaled activations. A
transcoder's input is already normalised by the block's pre-MLP norm and is left as it is.

Transcoder (``site="transcoder"``; Dunefsky et al. 2024): the input is block ``layer``'s MLP input
(after its norm), the target that MLP's output, both from the same pass (``harvest.mlp_pairs``);
b_dec (on the output side) is never subtracted from the input; FVU is against the target's
variance; Δ LM loss replaces the MLP's output with the transcoder's output (``harvest.spliced_mlp``).
The encoder is scaled on the first pass so that the initial output varies 0.1× as much as the
target (the two sites' scales can differ by orders of magnitude: unscaled, a tiny model's first
FVU was 15).
Saved as SAELens writes transcoders (``explorer.features.saelens_io``): ``jumprelu_transcoder``
for BatchTopK, ``topk_transcoder`` (this app's name; SAELens 6 has no TopK transcoder) for TopK.

Metrics. After every forward pass a log row: tokens, FVU and L0 (mean active latents) over the
pass's steps, and the dead-latent share: latents that did not fire in the last ``dead_window``
tokens (all tokens so far, while fewer). Every ``eval_every`` passes and at the end, on the
held-out windows: FVU, L0 and Δ LM loss = the model's mean next-token loss with the SAE's
reconstruction spliced in at the site (positions ≥ ``skip_first``) minus the clean loss.

Files (``out_dir``): ``cfg.json`` + ``sae_weights.safetensors`` (the SAELens layout,
``explorer.features.saelens_io``) and ``training.json`` (the ``SAETrainResult``), written at the
end and on cancel; while unfinished, ``.work/`` is the job directory (``explorer.core.jobdir``):
``job.json`` (the key: model, corpus, settings) and ``checkpoints/step-N/state.safetensors``
(weights, Adam moments, when each latent last fired, the corpus cursor, the metric rows; every
``checkpoint_seconds`` or ``checkpoint_every`` passes, and on cancel). Calling ``train_sae`` again
with the same ``out_dir`` and settings resumes from the last checkpoint and ends exactly as an
uninterrupted run (same weights, same metric rows); a finished run is reopened, not retrained.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from explorer.core.corpus import CorpusError, corpus_fingerprint, iter_documents, token_windows
from explorer.core.files import atomic_write_json, load_arrays, save_arrays
from explorer.core.jobdir import JobDir
from explorer.core.jobs import JobContext
from explorer.core.requests import build_request
from explorer.core.results import Result, array
from explorer.features.corpora import resolve_corpus
from explorer.features.harvest import activations, lm_loss, mlp_pairs, spliced, spliced_mlp
from explorer.features.sae import MLP_IN, SITES, TRANSCODER, SAEConfig, SAEError, SparseAutoencoder, hook_name
from explorer.features.saelens_io import save_sae

RESULT_FILE = "training.json"
STATE_FILE = "state.safetensors"
_PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
TRAIN_SITES = SITES + (TRANSCODER,)
TRAIN_ARCHITECTURES = ("topk", "batchtopk")
THRESHOLD_RULE = "pass-calibrated"   # BatchTopK's θ: mean L0 = k on the latest forward pass (module docstring)
TRANSCODER_INIT_SCALE = 0.1   # a transcoder's initial output spread, relative to its target's (FVU starts ≈ 1)


@dataclass(frozen=True)
class TrainConfig:
    """Settings of an SAE training run (see the module docstring)."""

    layer: int = 12
    site: str = "resid"               # resid, mlp_out, or transcoder (MLP input -> MLP output)
    architecture: str = "topk"        # topk or batchtopk (k per vector, or k·B per batch of B)
    width: int = 4608
    k: int = 32
    max_tokens: int = 2_000_000       # training tokens (model tokens read; the held-out windows extra)
    lr: float | None = None           # None: 5e-4 / sqrt(width / 2**14)
    batch: int = 1024                 # activation vectors per optimizer step
    window: int = 128
    batch_windows: int = 32           # windows per forward pass
    skip_first: int = 1
    corpus_path: str | None = None    # None: the default news corpus; "large": SOTU + Moby-Dick
    corpus_format: str = "auto"
    text_field: str = "text"
    text_mode: str = "lines"
    seed: int = 0
    eval_windows: int = 16
    eval_every: int = 20              # forward passes between evaluations
    dead_window: int = 200_000        # tokens without firing that make a latent dead
    aux_k: int | None = None          # None: d_in // 2
    aux_coef: float = 1 / 32
    warmup_steps: int = 50
    checkpoint_seconds: float = 60.0
    checkpoint_every: int | None = None  # forward passes between checkpoints (overrides seconds)

    def check(self, n_layers: int | None = None) -> None:
        """Name the first bad setting (layers against ``n_layers`` when given)."""
        if self.site not in TRAIN_SITES:
            raise SAEError(f"unknown site {self.site!r} (use {', '.join(TRAIN_SITES)})")
        if self.architecture not in TRAIN_ARCHITECTURES:
            raise SAEError(f"unknown training architecture {self.architecture!r} "
                           f"(use {' or '.join(TRAIN_ARCHITECTURES)})")
        if n_layers is not None and not 0 <= self.layer < n_layers:
            raise SAEError(f"layer {self.layer} is out of range: the model has layers 0..{n_layers - 1}")
        if self.width < 1 or not 1 <= self.k <= self.width:
            raise SAEError(f"need width ≥ 1 and 1 ≤ k ≤ width, got width {self.width}, k {self.k}")
        if self.window < 2 or not 0 <= self.skip_first < self.window:
            raise SAEError(f"need window ≥ 2 and 0 ≤ skip_first < window, got {self.window}, {self.skip_first}")
        if min(self.batch, self.batch_windows, self.eval_windows, self.eval_every, self.dead_window) < 1:
            raise SAEError("batch, batch_windows, eval_windows, eval_every and dead_window must be ≥ 1")
        if self.max_tokens < self.window:
            raise SAEError(f"max tokens ({self.max_tokens}) is less than one window ({self.window} tokens)")
        if self.lr is not None and not self.lr > 0:
            raise SAEError(f"the learning rate must be > 0, got {self.lr}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise SAEError("checkpoint_every must be ≥ 1 forward pass")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 5e-4 / math.sqrt(self.width / 2 ** 14)

    def settings(self) -> dict:
        """What determines the run's result (the checkpoint cadence does not)."""
        d = asdict(self)
        for key in ("checkpoint_seconds", "checkpoint_every", "corpus_path"):
            d.pop(key)
        if self.architecture == "topk":   # TopK runs keep the key and settings they had before the option
            d.pop("architecture")
        else:                             # not the runs saved with the earlier, running-average θ
            d["threshold"] = THRESHOLD_RULE
        return d

    @property
    def batch_topk(self) -> bool:
        return self.architecture == "batchtopk"

    @property
    def transcoder(self) -> bool:
        return self.site == TRANSCODER


@dataclass(frozen=True, eq=False)
class SAETrainResult(Result):
    """A training run: its status, latest evaluation, and the metric curves so far."""

    status: str                  # running / done / cancelled
    out_dir: str
    model: str
    layer: int
    site: str
    width: int
    k: int
    tokens: int                  # training tokens read so far
    total_tokens: int            # the run's target
    steps: int
    fvu: float | None            # the latest evaluation on the held-out windows (None before the first)
    l0: float | None
    delta_loss: float | None
    dead_fraction: float | None  # latents that did not fire in the last dead_window tokens
    clean_loss: float | None
    elapsed_s: float
    log_tokens: np.ndarray = array("N", "int64")
    log_fvu: np.ndarray = array("N", "float64")      # training FVU of each forward pass's steps
    log_l0: np.ndarray = array("N", "float64")
    log_dead: np.ndarray = array("N", "float64")
    eval_tokens: np.ndarray = array("E", "int64")
    eval_fvu: np.ndarray = array("E", "float64")
    eval_l0: np.ndarray = array("E", "float64")
    eval_delta_loss: np.ndarray = array("E", "float64")
    settings: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """The CLI's JSON: fvu, l0, dead_fraction, delta_loss, tokens (and where the SAE is)."""
        return {"fvu": self.fvu, "l0": self.l0, "dead_fraction": self.dead_fraction, "delta_loss": self.delta_loss,
                "tokens": self.tokens, "status": self.status, "clean_loss": self.clean_loss, "out": self.out_dir}


# ------------------------------------------------------------------------------ state
class TrainState:
    """Everything a checkpoint holds: the SAE being trained, Adam, the latent firing record,
    the corpus cursor and the metric rows."""

    def __init__(self, cfg: TrainConfig, d_in: int, device: torch.device, metadata: dict) -> None:
        self.cfg = cfg
        # BatchTopK is trained by batch and used (evaluated, saved) as the JumpReLU its threshold makes.
        arch = dict(architecture="jumprelu") if cfg.batch_topk else dict(architecture="topk", k=cfg.k)
        io = dict(d_out=d_in, apply_b_dec_to_input=False) if cfg.transcoder else {}
        if cfg.batch_topk and not cfg.transcoder:
            io = dict(normalize_activations="constant_norm_rescale")
        sae_cfg = SAEConfig(d_in=d_in, d_sae=cfg.width, metadata=metadata, **arch, **io)
        self.sae = SparseAutoencoder.init(sae_cfg, seed=cfg.seed, device=device)
        for n in _PARAMS:
            getattr(self.sae, n).requires_grad_(True)
        self.threshold: float | None = None   # BatchTopK: θ, calibrated on the latest pass
        self.opt = torch.optim.Adam([getattr(self.sae, n) for n in _PARAMS], lr=cfg.learning_rate)
        self.fired_at = torch.full((cfg.width,), -1, dtype=torch.int64, device=device)
        self.step = 0
        self.passes = 0
        self.windows_done = 0       # windows of the stream consumed (held-out ones included)
        self.tokens = 0             # training tokens
        self.cursor = (0, 0)
        self.clean_loss: float | None = None
        self.eval_ids: np.ndarray | None = None
        self.logs: list[dict] = []
        self.evals: list[dict] = []

    # ------------------------------------------------------------- dead latents
    def dead_mask(self) -> torch.Tensor:
        """Latents that did not fire in the last ``dead_window`` tokens (the AuxK loss's; a latent
        that never fired counts from the start, so none is dead in the first window)."""
        return self.fired_at.clamp_min(0) <= self.tokens - self.cfg.dead_window

    def dead_fraction(self) -> float:
        """The share reported: latents that did not fire in the last ``dead_window`` tokens, or in
        all tokens so far while fewer were read."""
        since = max(0, self.tokens - self.cfg.dead_window)
        return float((self.fired_at < since if since > 0 else self.fired_at < 0).float().mean())

    # ------------------------------------------------------------- storage
    def save(self, directory: Path) -> None:
        arrays = {f"sae.{n}": getattr(self.sae, n).detach().cpu().numpy() for n in _PARAMS}
        for i, state in self.opt.state_dict()["state"].items():
            for name, value in state.items():
                arrays[f"adam.{i}.{name}"] = torch.as_tensor(value).detach().cpu().numpy().reshape(-1) \
                    if name == "step" else value.detach().cpu().numpy()
        arrays["fired_at"] = self.fired_at.cpu().numpy()
        if self.eval_ids is not None:
            arrays["eval_ids"] = self.eval_ids
        state = {"step": self.step, "passes": self.passes, "windows_done": self.windows_done,
                 "tokens": self.tokens, "cursor": list(self.cursor), "clean_loss": self.clean_loss,
                 "logs": self.logs, "evals": self.evals}
        if self.cfg.batch_topk:
            state["threshold"] = self.threshold
        meta = {"state": json.dumps(state)}
        save_arrays(directory / STATE_FILE, arrays, meta)

    def load(self, directory: Path) -> None:
        try:
            arrays, meta = load_arrays(directory / STATE_FILE)
            state = json.loads(meta["state"])
        except (ValueError, KeyError) as e:
            raise SAEError(f"the checkpoint {directory} is unreadable ({e}); delete it to start over") from None
        device = self.sae.W_enc.device
        with torch.no_grad():
            for n in _PARAMS:
                getattr(self.sae, n).copy_(torch.from_numpy(np.array(arrays[f"sae.{n}"])))
        opt_state = self.opt.state_dict()
        opt_state["state"] = {}
        for i in range(len(_PARAMS)):
            if f"adam.{i}.exp_avg" in arrays:
                opt_state["state"][i] = {
                    "step": torch.tensor(float(arrays[f"adam.{i}.step"][0])),
                    "exp_avg": torch.from_numpy(np.array(arrays[f"adam.{i}.exp_avg"])).to(device),
                    "exp_avg_sq": torch.from_numpy(np.array(arrays[f"adam.{i}.exp_avg_sq"])).to(device)}
        self.opt.load_state_dict(opt_state)
        self.fired_at = torch.from_numpy(np.array(arrays["fired_at"])).to(device)
        self.eval_ids = np.array(arrays["eval_ids"]) if "eval_ids" in arrays else None
        self.step, self.passes = state["step"], state["passes"]
        self.windows_done, self.tokens = state["windows_done"], state["tokens"]
        self.cursor = tuple(state["cursor"])
        self.clean_loss, self.logs, self.evals = state["clean_loss"], state["logs"], state["evals"]
        if self.cfg.batch_topk:
            self.set_threshold(state.get("threshold"))

    def set_threshold(self, value: float | None) -> None:
        """BatchTopK: θ, copied into every latent's JumpReLU threshold."""
        self.threshold = value
        with torch.no_grad():
            self.sae.threshold.fill_(0.0 if value is None else value)


# ------------------------------------------------------------------------------ one step
def batch_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchTopK's selection: the k·N largest of pre-activations ``pre`` [N, width] across the
    batch, through a ReLU. Returns (rows, latents, values), ordered by row then latent.

    >>> rows, latents, values = batch_topk(torch.tensor([[3., -1., 2.], [0.5, 4., 1.]]), 1)
    >>> rows.tolist(), latents.tolist(), values.tolist()
    ([0, 1], [0, 1], [3.0, 4.0])
    """
    n, width = pre.shape
    top = pre.reshape(-1).topk(min(k * n, n * width))
    flat, order = top.indices.sort()
    return flat // width, flat % width, torch.relu(top.values[order])


def train_step(run: TrainState, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[float, float, torch.Tensor]:
    """One Adam step on activation vectors ``x`` [N, d_in] (a transcoder: inputs ``x``, targets
    ``y`` [N, d_out]); returns (FVU, L0, latents fired)."""
    cfg, sae = run.cfg, run.sae
    lr = cfg.learning_rate * min(1.0, (run.step + 1) / max(1, cfg.warmup_steps))
    for group in run.opt.param_groups:
        group["lr"] = lr
    if cfg.transcoder:
        pre = x @ sae.W_enc + sae.b_enc
        x = y                      # from here on, x is what is reconstructed
    else:
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    if cfg.batch_topk:
        rows, latents, vals = batch_topk(pre, cfg.k)
        counts = torch.bincount(rows, minlength=len(x))
        recon = F.embedding_bag(latents, sae.W_dec, torch.cumsum(counts, 0) - counts, per_sample_weights=vals,
                                mode="sum") + sae.b_dec
    else:
        top = pre.topk(cfg.k, dim=-1)
        vals = torch.relu(top.values)
        recon = F.embedding_bag(top.indices, sae.W_dec, per_sample_weights=vals, mode="sum") + sae.b_dec
    total_var = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
    fvu = (recon - x).pow(2).sum() / total_var
    loss = fvu
    dead = run.dead_mask()
    n_dead = int(dead.sum())
    if n_dead:
        aux_k = cfg.aux_k or sae.d_in // 2
        k_aux = min(aux_k, n_dead)
        aux_top = pre.masked_fill(~dead, -math.inf).topk(k_aux, dim=-1)
        aux_recon = F.embedding_bag(aux_top.indices, sae.W_dec, per_sample_weights=torch.relu(aux_top.values),
                                    mode="sum")
        residual = (x - recon).detach()
        aux = (aux_recon - residual).pow(2).sum() / total_var
        loss = loss + cfg.aux_coef * min(n_dead / aux_k, 1.0) * aux
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        w, g = sae.W_dec, sae.W_dec.grad
        g -= (g * w).sum(1, keepdim=True) * w   # rows stay unit-norm: drop the radial part
    run.opt.step()
    with torch.no_grad():
        sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
    active = vals > 0
    fired = torch.zeros(cfg.width, dtype=torch.bool, device=x.device)
    run.step += 1
    if cfg.batch_topk:
        fired[latents[active]] = True
        return float(fvu.detach()), float(active.sum()) / len(x), fired
    fired[top.indices[active]] = True
    return float(fvu.detach()), float(active.sum(-1).float().mean()), fired


def calibrate_threshold(run: TrainState, x: torch.Tensor) -> float:
    """BatchTopK: the θ at which "keep h > θ" keeps k latents per vector on average over ``x``
    [N, d_in] (as the SAE is trained: scaled, for a residual SAE): the (k·N+1)-th largest
    pre-activation, or 0 if fewer than k·N+1 are positive. Read ``cfg.batch`` rows at a time,
    keeping only the k·N+1 largest so far."""
    cfg, sae = run.cfg, run.sae
    n = cfg.k * len(x) + 1
    best = x.new_empty(0)
    with torch.no_grad():
        for i in range(0, len(x), cfg.batch):
            rows = x[i:i + cfg.batch]
            pre = rows @ sae.W_enc + sae.b_enc if cfg.transcoder else (rows - sae.b_dec) @ sae.W_enc + sae.b_enc
            best = torch.cat([best, pre.reshape(-1)])
            best = best.topk(min(n, len(best))).values
    return max(float(best[-1]), 0.0) if len(best) == n else 0.0


# ------------------------------------------------------------------------------ evaluation
def evaluate(session, sae: SparseAutoencoder, ids: torch.Tensor, layer: int, site: str,
             skip_first: int) -> tuple[float, float, float]:
    """(FVU, L0, LM loss with the reconstruction spliced in at positions ≥ ``skip_first``) on ``ids``
    (``site="transcoder"``: the MLP's output replaced by the transcoder's output of the MLP's input)."""
    if site == TRANSCODER:
        return _evaluate_transcoder(session, sae, ids, layer, skip_first)
    with torch.no_grad():
        acts = activations(session, ids, layer, site).float()
        x = acts[:, skip_first:].reshape(-1, acts.shape[-1])
        f = sae.encode(x)
        fvu = float((sae.decode(f, x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12))
        l0 = float((f > 0).sum(-1).float().mean())

        def reconstruct(out: torch.Tensor) -> torch.Tensor:
            y = out.clone()
            y[:, skip_first:] = sae(out[:, skip_first:].float()).to(out.dtype)
            return y

        with session.lock, spliced(session, layer, site, reconstruct):
            loss = lm_loss(session, ids)
    return fvu, l0, loss


def _evaluate_transcoder(session, sae: SparseAutoencoder, ids: torch.Tensor, layer: int,
                         skip_first: int) -> tuple[float, float, float]:
    with torch.no_grad():
        inp, out = mlp_pairs(session, ids, layer)
        x = inp[:, skip_first:].reshape(-1, inp.shape[-1]).float()
        y = out[:, skip_first:].reshape(-1, out.shape[-1]).float()
        f = sae.encode(x)
        fvu = float((sae.decode(f) - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum().clamp_min(1e-12))
        l0 = float((f > 0).sum(-1).float().mean())

        def replace(mlp_in: torch.Tensor, mlp_out: torch.Tensor) -> torch.Tensor:
            z = mlp_out.clone()
            z[:, skip_first:] = sae(mlp_in[:, skip_first:].float()).to(mlp_out.dtype)
            return z

        with session.lock, spliced_mlp(session, layer, replace):
            loss = lm_loss(session, ids)
    return fvu, l0, loss


# ------------------------------------------------------------------------------ the job
def _key(session, cfg: TrainConfig, corpus: dict) -> str:
    info = session.info()
    payload = {"model": info.name, "config_hash": info.config_hash, "dtype": info.dtype,
               "corpus": {k: corpus[k] for k in ("size", "head_sha256")}, "settings": cfg.settings()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def default_sae_dir(key: str) -> Path:
    from explorer.core.defaults import cache_dir

    return cache_dir() / "saes" / key


def load_training(out_dir: str | Path) -> SAETrainResult:
    """The ``SAETrainResult`` saved with a trained (or cancelled) SAE."""
    path = Path(out_dir).expanduser() / RESULT_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return SAETrainResult.from_dict(data["result"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SAEError(f"{path} is missing or unreadable ({e})") from None


def _result(session, run: TrainState, status: str, out: Path, elapsed: float) -> SAETrainResult:
    cfg = run.cfg
    last = run.evals[-1] if run.evals else {}
    dead = run.dead_fraction() if run.tokens else None

    def col(rows, key, dtype):
        return np.array([r[key] for r in rows], dtype=dtype)

    return SAETrainResult(
        status=status, out_dir=str(out), model=session.name, layer=cfg.layer, site=cfg.site, width=cfg.width,
        k=cfg.k, tokens=run.tokens, total_tokens=cfg.max_tokens, steps=run.step, fvu=last.get("fvu"),
        l0=last.get("l0"), delta_loss=last.get("delta_loss"), dead_fraction=dead, clean_loss=run.clean_loss,
        elapsed_s=round(elapsed, 2),
        log_tokens=col(run.logs, "tokens", np.int64), log_fvu=col(run.logs, "fvu", np.float64),
        log_l0=col(run.logs, "l0", np.float64), log_dead=col(run.logs, "dead", np.float64),
        eval_tokens=col(run.evals, "tokens", np.int64), eval_fvu=col(run.evals, "fvu", np.float64),
        eval_l0=col(run.evals, "l0", np.float64), eval_delta_loss=col(run.evals, "delta_loss", np.float64),
        settings=dict(cfg.settings(), corpus_path=cfg.corpus_path))


def _evaluate_into(session, run: TrainState) -> None:
    cfg = run.cfg
    ids = torch.from_numpy(run.eval_ids)
    fvu, l0, loss = evaluate(session, run.sae, ids, cfg.layer, cfg.site, cfg.skip_first)
    run.evals.append({"tokens": run.tokens, "step": run.step, "fvu": fvu, "l0": l0, "spliced_loss": loss,
                      "delta_loss": loss - run.clean_loss})


def train_sae(session, request: TrainConfig | None = None, /, *, ctx: JobContext | None = None,
              out_dir: str | Path | None = None, **fields: Any) -> SAETrainResult:
    """Train (or resume, or reopen) a TopK or BatchTopK SAE, or a transcoder, on one site of
    ``session``'s model (module docstring).

    Progress goes to ``ctx.report(tokens, max_tokens, partial=SAETrainResult, message=...)``
    after every forward pass; a cancelled run checkpoints, saves its SAE so far and returns
    (status ``cancelled``); calling again with the same ``out_dir`` resumes it.

    >>> from explorer.features.train import train_sae
    >>> run = train_sae(session, layer=3, width=64, k=4, max_tokens=2048, window=64, batch=256,
    ...                 batch_windows=8, eval_windows=2, out_dir="sae")
    >>> run.status, run.tokens, 0 < run.fvu
    ('done', 2048, True)
    """
    session.require_local("SAE training")
    cfg = build_request(TrainConfig, request, fields)
    cfg.check(session.n_layers)
    corpus_path = resolve_corpus(cfg.corpus_path)
    corpus = corpus_fingerprint(corpus_path)
    key = _key(session, cfg, corpus)
    out = Path(out_dir).expanduser() if out_dir is not None else default_sae_dir(key)
    if (out / RESULT_FILE).exists():
        saved = json.loads((out / RESULT_FILE).read_text(encoding="utf-8"))
        if saved.get("key") != key:
            raise SAEError(f"{out} holds an SAE of another model, corpus or settings; choose another directory")
        if saved.get("complete"):
            return load_training(out)
    elif out.exists() and any(p.name != ".work" for p in out.iterdir()):
        raise SAEError(f"{out} exists and is not an SAE training directory; choose an empty or new directory")
    job = JobDir(out / ".work", manifest="job.json")
    saved_job = job.read()
    if saved_job is not None and saved_job.get("key") != key:
        raise SAEError(f"{out} holds the checkpoint of another run; delete {job.path} to start over")
    checkpoints = job.checkpoints()
    checkpoints.clean()

    d_in = int(session.hf.config.hidden_size)
    info = session.info()
    metadata = {"model_name": info.name, "hook_name": hook_name(cfg.layer, MLP_IN if cfg.transcoder else cfg.site),
                "hook_layer": cfg.layer, "context_size": cfg.window, "prepend_bos": False,
                "dataset_path": corpus["path"],
                "explorer": {"config_hash": info.config_hash, "site": cfg.site, "layer": cfg.layer,
                             "trained_by": "explorer.features.train (TopK, AuxK)", "key": key}}
    if cfg.transcoder:
        metadata["hook_name_out"] = hook_name(cfg.layer, "mlp_out")
    if cfg.batch_topk:
        metadata["explorer"].update(trained_by="explorer.features.train (BatchTopK, AuxK)", architecture="batchtopk",
                                    k=cfg.k, threshold=THRESHOLD_RULE)
    run = TrainState(cfg, d_in, session.device, metadata)
    latest = checkpoints.latest() if saved_job is not None else None
    if latest is not None:
        run.load(latest[1])
    else:
        checkpoints.drop(after=-1)
        job.write({"kind": "sae-train", "key": key, "settings": cfg.settings(), "corpus": corpus})

    docs = iter_documents(corpus_path, format=cfg.corpus_format, text_field=cfg.text_field, text_mode=cfg.text_mode)
    n_windows = cfg.eval_windows + cfg.max_tokens // cfg.window
    windows = token_windows(docs, session.tokenizer, cfg.window, n_windows * cfg.window,
                            start=run.cursor, start_index=run.windows_done)
    if run.eval_ids is None:
        held = [next(windows, None) for _ in range(cfg.eval_windows)]
        if held[-1] is None:
            raise CorpusError(f"corpus {corpus_path} has fewer than {cfg.eval_windows + 1} windows of "
                              f"{cfg.window} tokens")
        run.eval_ids = np.stack([w.ids for w in held]).astype(np.int64)
        run.windows_done, run.cursor = len(held), held[-1].end
        run.clean_loss = lm_loss(session, torch.from_numpy(run.eval_ids))

    t0 = time.monotonic()
    start_tokens, last_ckpt, since_ckpt = run.tokens, t0, 0
    cancelled = False

    def checkpoint() -> None:
        if run.passes in checkpoints.steps():
            return
        with checkpoints.new(run.passes) as tmp:
            run.save(tmp)
        checkpoints.drop(before=run.passes)

    batch: list = []
    for w in windows:
        batch.append(w)
        if len(batch) < cfg.batch_windows:
            continue
        if ctx is not None and ctx.cancelled:
            cancelled = True
            break
        _train_pass(session, run, batch)
        batch = []
        since_ckpt += 1
        now = time.monotonic()
        if (cfg.checkpoint_every is not None and since_ckpt >= cfg.checkpoint_every) or \
                (cfg.checkpoint_every is None and now - last_ckpt >= cfg.checkpoint_seconds):
            checkpoint()
            since_ckpt, last_ckpt = 0, now
        if ctx is not None:
            rate = (run.tokens - start_tokens) / max(now - t0, 1e-9)
            ctx.report(run.tokens, cfg.max_tokens, partial=_result(session, run, "running", out, now - t0),
                       message=f"{rate:,.0f} tokens/s")
    else:
        if batch and not (ctx is not None and ctx.cancelled):
            _train_pass(session, run, batch)   # the stream's last, shorter pass
        cancelled = ctx is not None and ctx.cancelled
    if run.tokens == 0:
        shutil.rmtree(job.path, ignore_errors=True)
        if cancelled:
            raise SAEError("training was cancelled before its first forward pass finished: nothing was trained")
        raise CorpusError(f"corpus {corpus_path} has no training windows after the {cfg.eval_windows} held out")
    if not cancelled and (not run.evals or run.evals[-1]["step"] != run.step):
        _evaluate_into(session, run)
    elapsed = time.monotonic() - t0
    status = "cancelled" if cancelled else "done"
    if cancelled:
        checkpoint()
    result = _result(session, run, status, out, elapsed)
    save_sae(run.sae, out)
    atomic_write_json(out / RESULT_FILE, {"key": key, "complete": not cancelled, "result": result.to_dict()},
                      allow_nan=False)
    if not cancelled:
        shutil.rmtree(job.path, ignore_errors=True)
    if ctx is not None:
        ctx.report(run.tokens, cfg.max_tokens if cancelled else run.tokens, partial=result, message=status)
    return result


def _train_pass(session, run: TrainState, batch: list) -> None:
    """One forward pass over ``batch`` windows, its optimizer steps, its log row (and evaluation)."""
    cfg = run.cfg
    ids = torch.from_numpy(np.stack([w.ids for w in batch]))
    y = None
    if cfg.transcoder:
        inp, out = mlp_pairs(session, ids, cfg.layer)
        x = inp.float()[:, cfg.skip_first:].reshape(-1, inp.shape[-1])
        y = out.float()[:, cfg.skip_first:].reshape(-1, out.shape[-1])
    else:
        acts = activations(session, ids, cfg.layer, cfg.site).float()
        x = acts[:, cfg.skip_first:].reshape(-1, acts.shape[-1])
        if cfg.batch_topk:   # each vector to norm √d, as the saved SAE's constant_norm_rescale does
            x = x * (x.shape[-1] ** 0.5 / x.norm(dim=-1, keepdim=True))
    if run.step == 0:
        with torch.no_grad():
            run.sae.b_dec.copy_((x if y is None else y).mean(0))
            if y is not None:
                _scale_encoder(run, x, y)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + run.passes)
    perm = torch.randperm(len(x), generator=g).to(x.device)
    x = x[perm]
    if y is not None:
        y = y[perm]
    fvus, l0s, sizes = [], [], []
    fired = torch.zeros(cfg.width, dtype=torch.bool, device=x.device)
    for i in range(0, len(x), cfg.batch):
        fvu, l0, f = train_step(run, x[i:i + cfg.batch], None if y is None else y[i:i + cfg.batch])
        fvus.append(fvu)
        l0s.append(l0)
        sizes.append(len(x[i:i + cfg.batch]))
        fired |= f
    if cfg.batch_topk:
        run.set_threshold(calibrate_threshold(run, x))
    run.passes += 1
    run.windows_done += len(batch)
    run.cursor = batch[-1].end
    run.tokens += len(batch) * cfg.window
    run.fired_at[fired] = run.tokens
    weights = np.array(sizes, dtype=np.float64) / sum(sizes)
    run.logs.append({"tokens": run.tokens, "step": run.step, "fvu": float(np.dot(fvus, weights)),
                     "l0": float(np.dot(l0s, weights)), "dead": run.dead_fraction()})
    if run.passes % cfg.eval_every == 0:
        _evaluate_into(session, run)


def _scale_encoder(run: TrainState, x: torch.Tensor, y: torch.Tensor) -> None:
    """A transcoder's encoder, scaled on the first pass so that its initial output varies as
    ``TRANSCODER_INIT_SCALE`` × the target does: its input and output sites can differ in
    scale by orders of magnitude (an SAE's encoder = decoder transposed needs no such step). The
    TopK and BatchTopK selections are unchanged by a positive scale; the output scales with it."""
    sae, k = run.sae, run.cfg.k
    pre = x @ sae.W_enc + sae.b_enc
    top = pre.topk(k, dim=-1)
    out = F.embedding_bag(top.indices, sae.W_dec, per_sample_weights=torch.relu(top.values), mode="sum")
    spread = out.pow(2).sum().sqrt()
    if spread > 0:
        sae.W_enc.mul_(TRANSCODER_INIT_SCALE * (y - y.mean(0)).pow(2).sum().sqrt() / spread)


def sae_train_job(session, config: TrainConfig, out_dir: str | Path | None = None, **job_kwargs):
    """A ``Job`` that runs ``train_sae`` (start it, or ``run()`` it here)."""
    from explorer.core.jobs import Job

    return Job(lambda ctx: train_sae(session, config, ctx=ctx, out_dir=out_dir), name="sae-train", **job_kwargs)
