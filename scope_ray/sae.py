"""BatchTopK sparse autoencoder (METHOD §2): trained with BatchTopK, used as a JumpReLU at inference.

Shape suffixes: B tokens in a batch, D input width (``d_in``), F dictionary width (``d_sae``).
docs/sae.md is the reference for the equations, every parameter and buffer, and the file format.

The input scale s (E‖x·s‖² = d over a sample) is a training device only. ``b_enc``, ``b_dec`` and
θ are stored in the scaled space, but encode/decode always use their folded values ``b/s`` and
``θ/s``, so callers pass and receive activations in the backbone's own units and z_j·W_dec[j] is
feature j's contribution in those units. Because the folded values are computed with the very
division ``fold_input_scale`` and ``save`` perform (and ``b/1`` is exact), an SAE before folding,
after folding and after a save/load round trip computes bit-identical outputs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from scope_ray.sae_step import sparse_loss, use_sparse_step
from scope_ray.storage import read_uri_bytes, write_uri_bytes

FORMAT = "scope_ray.BatchTopKSAE"
FORMAT_VERSION = 1
METADATA_KEY = "scope_ray_sae"  # safetensors header metadata entry holding the JSON config
CONFIG_KEYS = ("d_in", "d_sae", "k", "k_aux", "dead_after_tokens", "threshold_ema")
TENSOR_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "input_scale",
                "tokens_since_fired", "num_tokens_seen")


# Combines one step's statistics over data-parallel workers: (fired_F, smallest kept activation,
# tokens) of this worker's batch -> the same three over every worker's batch. Training code sets
# ``BatchTopKSAE.stats_reducer`` to one made of collectives; this module stays free of them.
StatsReducer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class SAELoss:
    """One training step's loss (``total`` carries the graph; the rest are for logging)."""

    total: torch.Tensor  # mse + aux_coef * aux
    mse: torch.Tensor  # mean over tokens of ‖x·s − x̂·s‖² (summed over D, scaled space)
    aux: torch.Tensor  # AuxK: mean over tokens of ‖e − ê‖² in the same units; 0 when no latent is dead
    fvu: float  # Σ‖x − x̂‖² / Σ‖x − x̄‖² over this batch
    l0: float  # mean non-zero latents per token
    dead_fraction: float  # fraction of latents treated as dead in this step


def batch_topk(pre_BF: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``k·B`` largest entries of the whole batch, zero the rest; also return the kept values.

    A flat ``topk`` plus scatter keeps exactly ``k·B`` entries even when values tie.
    """
    n_keep = min(k * pre_BF.shape[0], pre_BF.numel())
    kept, idx = _largest(pre_BF.flatten(), n_keep)
    z_BF = torch.zeros_like(pre_BF).flatten().scatter(0, idx, kept).view_as(pre_BF)
    return z_BF, kept


# Below this many entries a plain topk is already cheap.
_PREFILTER_MIN_ENTRIES = 1 << 16
_PREFILTER_STRIDE = 64


def _largest(flat: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` largest entries of ``flat`` and their indices: exactly ``flat.topk(n)``'s set.

    topk over all B·F entries was ~15 % of a CPU training step (B = 1024, F = 3072). Entries
    below a threshold estimated from a strided sample cannot be among the n largest as long as at
    least n entries pass it, which is checked; then topk runs on the few survivors only. When the
    check fails (an unlucky sample) the full topk runs, so the result is always exact.
    """
    if flat.numel() < _PREFILTER_MIN_ENTRIES or 4 * n > flat.numel():
        return flat.topk(n, sorted=False)
    sample = flat.detach()[::_PREFILTER_STRIDE].float()
    keep_fraction = min(1.0, 1.5 * n / flat.numel())  # 1.5x margin: survivors rarely fall short
    cut = torch.quantile(sample, 1.0 - keep_fraction).to(flat.dtype)
    survivors = (flat.detach() >= cut).nonzero().squeeze(1)
    if survivors.numel() < n:
        return flat.topk(n, sorted=False)
    kept, j = flat[survivors].topk(n, sorted=False)
    return kept, survivors[j]


class BatchTopKSAE(nn.Module):
    """``W_enc`` [D, F], ``b_enc`` [F], ``W_dec`` [F, D] (rows = unit-norm atoms), ``b_dec`` [D].

    Buffers: ``threshold`` θ (scaled space; 0 = not estimated yet), ``input_scale`` s,
    ``tokens_since_fired`` [F] and ``num_tokens_seen`` (long) for dead-latent tracking.
    """

    def __init__(self, d_in: int, d_sae: int, k: int, *, k_aux: int = 512,
                 dead_after_tokens: int = 10_000_000, threshold_ema: float = 0.99):
        super().__init__()
        if d_in < 1 or d_sae < 1 or not 1 <= k <= d_sae:
            raise ValueError(f"need d_in ≥ 1, d_sae ≥ 1 and 1 ≤ k ≤ d_sae; got {d_in=}, {d_sae=}, {k=}")
        if k_aux < 1 or dead_after_tokens < 0 or not 0.0 <= threshold_ema < 1.0:
            raise ValueError(f"need k_aux ≥ 1, dead_after_tokens ≥ 0, 0 ≤ threshold_ema < 1; "
                             f"got {k_aux=}, {dead_after_tokens=}, {threshold_ema=}")
        self.d_in, self.d_sae, self.k, self.k_aux = d_in, d_sae, k, k_aux
        self.dead_after_tokens, self.threshold_ema = dead_after_tokens, threshold_ema
        W_dec_FD = torch.randn(d_sae, d_in)
        W_dec_FD /= W_dec_FD.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec_FD)
        self.W_enc = nn.Parameter(W_dec_FD.T.clone())  # tied init
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.long))
        self.register_buffer("num_tokens_seen", torch.zeros((), dtype=torch.long))
        # Latents that fired again after being dead (AuxK at work), since this module was built;
        # not part of the saved state (training logs read it as a running count).
        self.register_buffer("revived_total", torch.zeros((), dtype=torch.long), persistent=False)
        # Which loss implementation ``loss`` uses: None picks by size (scope_ray.sae_step.use_sparse_step),
        # True / False force the sparse / dense one (same function; for tests and benchmarks).
        self.sparse_step: bool | None = None
        # None: statistics of this process's batches only. Under DDP, a reducer makes θ, the dead
        # counters and the revival count those of the global batch, identical on every worker.
        self.stats_reducer: StatsReducer | None = None

    def config(self) -> dict:
        """The constructor arguments (what ``save`` writes and ``load`` rebuilds from)."""
        return {key: getattr(self, key) for key in CONFIG_KEYS}

    # --- the model ----------------------------------------------------------------------------
    def _folded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``b_enc``, ``b_dec``, θ in input units; the one place the scale enters the function."""
        s = self.input_scale
        return self.b_enc / s, self.b_dec / s, self.threshold / s

    def pre_acts(self, x_BD: torch.Tensor) -> torch.Tensor:
        """ReLU(W_enc (x − b_dec) + b_enc) in input units (= the scaled-space value divided by s)."""
        b_enc_F, b_dec_D, _ = self._folded()
        return torch.relu((x_BD.to(self.W_enc.dtype) - b_dec_D) @ self.W_enc + b_enc_F)

    def encode(self, x_BD: torch.Tensor, use_threshold: bool = True) -> torch.Tensor:
        """z_BF: JumpReLU pre·[pre > θ] (inference), or BatchTopK over this batch (``use_threshold=False``)."""
        pre_BF = self.pre_acts(x_BD)
        if not use_threshold:
            return batch_topk(pre_BF, self.k)[0]
        if not bool(self.threshold > 0):
            raise RuntimeError("BatchTopKSAE threshold θ was never estimated (train the SAE in train mode "
                               "or load a trained one); use encode(x, use_threshold=False) for BatchTopK")
        return torch.where(pre_BF > self._folded()[2], pre_BF, 0.0)

    def decode(self, z_BF: torch.Tensor) -> torch.Tensor:
        """x̂_BD = z W_dec + b_dec, in input units."""
        return z_BF.to(self.W_dec.dtype) @ self.W_dec + self._folded()[1]

    def forward(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_hat_BD, z_BF)``: BatchTopK and statistics updates in train mode, the threshold in eval."""
        if self.training:
            x_hat_BD, z_BF, _ = self._train_forward(x_BD)
            return x_hat_BD, z_BF
        z_BF = self.encode(x_BD)
        return self.decode(z_BF), z_BF

    def _train_forward(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pre_BF = self.pre_acts(x_BD)
        z_BF, kept = batch_topk(pre_BF, self.k)
        if self.training:
            self._update_statistics(z_BF.detach(), kept.detach())
        return self.decode(z_BF), z_BF, pre_BF

    @torch.no_grad()
    def _update_statistics(self, z_BF: torch.Tensor, kept: torch.Tensor) -> None:
        self._record_statistics((z_BF > 0).any(dim=0), kept, z_BF.shape[0])

    @torch.no_grad()
    def _record_statistics(self, fired_F: torch.Tensor, kept: torch.Tensor, n_tokens: int) -> None:
        """One batch's statistics: which latents fired, its BatchTopK kept values, its size."""
        smallest = torch.where(kept > 0, kept, math.inf).min() if kept.numel() else kept.new_full((), math.inf)
        self._apply_statistics(fired_F, smallest * self.input_scale, torch.tensor(n_tokens, device=fired_F.device))

    @torch.no_grad()
    def observe_empty_batch(self) -> None:
        """A training step in which this worker has no token (no finite row): nothing fired, no
        tokens seen, but a ``stats_reducer`` still joins the other workers' statistics."""
        dev = self.threshold.device
        self._apply_statistics(torch.zeros(self.d_sae, dtype=torch.bool, device=dev),
                               torch.tensor(math.inf, device=dev), torch.tensor(0, device=dev))

    @torch.no_grad()
    def _apply_statistics(self, fired_F: torch.Tensor, smallest: torch.Tensor, n_tokens: torch.Tensor) -> None:
        if self.stats_reducer is not None:
            fired_F, smallest, n_tokens = self.stats_reducer(fired_F, smallest, n_tokens)
        # θ: EMA of the smallest kept *positive* activation (scaled space); the first estimate
        # replaces the 0 sentinel. torch.where instead of `if` keeps this free of device syncs.
        ema = self.threshold_ema * self.threshold + (1 - self.threshold_ema) * smallest
        new = torch.where(self.threshold > 0, ema, smallest)
        self.threshold.copy_(torch.where(torch.isfinite(smallest), new, self.threshold))
        self.revived_total += (fired_F & self.dead_mask()).sum()
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired_F] = 0
        self.num_tokens_seen += n_tokens

    def dead_mask(self) -> torch.Tensor:
        """[F] bool: latents that have not fired for more than ``dead_after_tokens`` tokens."""
        return self.tokens_since_fired > self.dead_after_tokens

    # --- input scale --------------------------------------------------------------------------
    @torch.no_grad()
    def set_input_scale_from(self, sample_BD: torch.Tensor) -> float:
        """Set s = sqrt(d / E‖x‖²) over a sample; the function is unchanged (biases and θ are rescaled)."""
        sample = torch.as_tensor(sample_BD).to(torch.float64).reshape(-1, self.d_in)
        mean_sq = float(sample.pow(2).sum(dim=1).mean())
        if not mean_sq > 0 or not math.isfinite(mean_sq):
            raise ValueError(f"cannot set the input scale from a sample with E‖x‖² = {mean_sq}")
        ratio = math.sqrt(self.d_in / mean_sq) / float(self.input_scale)
        for t in (self.b_enc, self.b_dec, self.threshold):
            t.mul_(ratio)
        self.input_scale.mul_(ratio)
        return float(self.input_scale)

    @torch.no_grad()
    def init_b_dec(self, sample_BD: torch.Tensor) -> None:
        """b_dec ← the sample mean (in input units; stored scaled)."""
        mean_D = torch.as_tensor(sample_BD).to(torch.float64).reshape(-1, self.d_in).mean(dim=0)
        self.b_dec.copy_(mean_D.to(self.b_dec) * self.input_scale)

    @torch.no_grad()
    def fold_input_scale(self) -> "BatchTopKSAE":
        """Make s = 1 with bit-identical outputs. For finished SAEs: optimizer state would go stale."""
        for t, folded in zip((self.b_enc, self.b_dec, self.threshold), self._folded()):
            t.copy_(folded)
        self.input_scale.fill_(1.0)
        return self

    # --- training -----------------------------------------------------------------------------
    def loss(self, x_BD: torch.Tensor, aux_coef: float = 1 / 32) -> SAELoss:
        """BatchTopK reconstruction loss plus AuxK, in the scaled space (statistics update in train mode).

        Large batches take the sparse implementation (scope_ray/sae_step.py: no dense B x F
        product where only K·B entries are non-zero); the code below is the dense reference it
        is tested against. ``sparse_step`` overrides the choice."""
        sparse = self.sparse_step
        if sparse is None:
            sparse = use_sparse_step(x_BD.shape[0], self.d_sae, self.k, self.W_enc.device) and not x_BD.requires_grad
        if sparse:
            return sparse_loss(self, x_BD, aux_coef)
        x_BD = x_BD.to(self.W_enc.dtype)
        dead_F = self.dead_mask()  # as of before this batch
        x_hat_BD, z_BF, pre_BF = self._train_forward(x_BD)
        s = self.input_scale
        err_BD = (x_BD - x_hat_BD) * s
        mse = err_BD.pow(2).sum(dim=1).mean()
        aux = self._aux_loss(err_BD.detach(), pre_BF, dead_F)
        with torch.no_grad():
            var = ((x_BD - x_BD.mean(dim=0)) * s).pow(2).sum()
            fvu = float(err_BD.pow(2).sum() / var)
            l0 = float((z_BF != 0).sum(dim=1).double().mean())
        return SAELoss(total=mse + aux_coef * aux, mse=mse, aux=aux, fvu=fvu, l0=l0,
                       dead_fraction=float(dead_F.double().mean()))

    def _aux_loss(self, err_BD: torch.Tensor, pre_BF: torch.Tensor, dead_F: torch.Tensor) -> torch.Tensor:
        # AuxK (Gao et al. 2024): the dead latents' top-k_aux activations model the residual,
        # which gives them a gradient they never get from the main loss.
        n_dead = int(dead_F.sum())
        if n_dead == 0:
            return pre_BF.new_zeros(())
        vals_BK, idx_BK = pre_BF.masked_fill(~dead_F, -math.inf).topk(min(self.k_aux, n_dead), dim=1)
        z_aux_BF = torch.zeros_like(pre_BF).scatter(1, idx_BK, vals_BK)
        e_hat_BD = (z_aux_BF @ self.W_dec) * self.input_scale  # no b_dec: it models a residual
        return (err_BD - e_hat_BD).pow(2).sum(dim=1).mean()

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the part of W_dec.grad along each atom (call before ``optimizer.step``)."""
        if self.W_dec.grad is None:
            return
        w_FD, grad_FD = self.W_dec, self.W_dec.grad
        # Row dot products as a batched matmul and the update in place: the elementwise version
        # made three F x D temporaries, ~15 % of a sparse step at F = 24,576 (bench/README.md).
        dot_F = torch.bmm(grad_FD.unsqueeze(1), w_FD.unsqueeze(2)).view(-1)
        along_F1 = (dot_F / w_FD.norm(dim=1).square().clamp_min(1e-12)).unsqueeze(1)
        grad_FD.addcmul_(along_F1, w_FD, value=-1.0)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every atom to unit norm (call after ``optimizer.step``)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def training_step(self, x_BD: torch.Tensor, optimizer: torch.optim.Optimizer,
                      aux_coef: float = 1 / 32) -> SAELoss:
        """zero_grad → loss (updates θ and dead counters) → backward → project → step → renormalise."""
        if not self.training:
            raise RuntimeError("training_step needs train mode (call sae.train())")
        optimizer.zero_grad(set_to_none=True)
        record = self.loss(x_BD, aux_coef)
        record.total.backward()
        self.remove_parallel_grad()
        optimizer.step()
        self.normalize_decoder()
        return record

    # --- files --------------------------------------------------------------------------------
    def save(self, path: str | Path, *, endpoint_url: str | None = None) -> None:
        """One safetensors file (JSON config in its header metadata), input scale folded in."""
        with torch.no_grad():
            folded = dict(zip(("b_enc", "b_dec", "threshold"), self._folded()))
            tensors = {name: folded.get(name, getattr(self, name)).detach().cpu().contiguous()
                       for name in TENSOR_NAMES}
        tensors["input_scale"] = torch.ones_like(tensors["input_scale"])
        config = {"format": FORMAT, "format_version": FORMAT_VERSION, **self.config(),
                  "folded_input_scale": float(self.input_scale)}
        blob = safetensors.torch.save(tensors, metadata={METADATA_KEY: json.dumps(config)})
        write_uri_bytes(str(path), blob, endpoint_url)  # whole or not at all, locally and on S3

    @classmethod
    def load(cls, path: str | Path, *, endpoint_url: str | None = None,
             device: str | torch.device = "cpu") -> "BatchTopKSAE":
        """Read a file written by ``save`` (safetensors bytes and JSON only, never pickle); eval mode."""
        blob = read_uri_bytes(str(path), endpoint_url, "SAE file")
        try:
            tensors = safetensors.torch.load(blob)
            header_len = int.from_bytes(blob[:8], "little")
            config = json.loads(json.loads(blob[8:8 + header_len])["__metadata__"][METADATA_KEY])
        except Exception as exc:  # noqa: BLE001 - any parse failure means "not our file"
            raise ValueError(f"{path} is not a BatchTopKSAE safetensors file ({type(exc).__name__}: {exc})") from None
        if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported format {config.get('format')!r} "
                             f"version {config.get('format_version')!r}; expected {FORMAT!r} v{FORMAT_VERSION}")
        missing = [key for key in CONFIG_KEYS if key not in config]
        if missing:
            raise ValueError(f"{path}: config lacks {missing}")
        if set(tensors) != set(TENSOR_NAMES):
            raise ValueError(f"{path}: tensors {sorted(tensors)}, expected {sorted(TENSOR_NAMES)}")
        with torch.random.fork_rng(devices=[]):  # loading must not advance the caller's RNG
            sae = cls(**{key: config[key] for key in CONFIG_KEYS})
        sae.to(tensors["W_enc"].dtype)
        try:
            sae.load_state_dict(tensors, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"{path}: tensors do not match the config {config}: {exc}") from None
        return sae.to(device).eval()
