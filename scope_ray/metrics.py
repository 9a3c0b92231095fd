"""SAE quality metrics of Table 6 (METHOD §2): FVU, L0 and cosine similarity, in one pass or streamed.

Shape suffixes: N tokens, D input width, F dictionary width. Inputs may be torch tensors or NumPy
arrays with any leading dims (flattened to tokens). Everything is accumulated in float64.

Streaming uses Chan et al.'s pairwise merge of (count, mean, Σ‖x − x̄‖²) rather than
Σ‖x‖² − N‖x̄‖²: residual streams have large means, and the subtraction would lose most digits.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def _tokens(a: Any, name: str) -> torch.Tensor:
    if isinstance(a, np.ndarray) and not a.flags.writeable:
        a = a.copy()  # e.g. zero-copy Arrow buffers; torch would warn on every batch
    t = torch.as_tensor(a).detach()
    if t.ndim < 1 or t.shape[-1] == 0:
        raise ValueError(f"{name} needs shape [..., width] with width ≥ 1; got {tuple(t.shape)}")
    return t.reshape(-1, t.shape[-1])


class MetricAccumulator:
    """Streaming FVU / L0 / CS over batches, plus per-latent firing counts.

    ``update`` batch by batch (or ``merge`` accumulators from several workers); ``result`` equals
    ``sae_metrics`` on the concatenation of everything seen.
    """

    def __init__(self) -> None:
        self.n_tokens = 0
        self.mean_D: np.ndarray | None = None  # mean of x
        self.centered_sq = 0.0  # Σ‖x − x̄‖²
        self.err_sq = 0.0  # Σ‖x − x̂‖²
        self.cos_sum = 0.0  # Σ cos(x, x̂)
        self.nonzero = 0  # Σ over tokens of the number of non-zero latents
        self.fire_counts: np.ndarray | None = None  # [F] int64: tokens on which latent j is non-zero

    def update(self, x: Any, x_hat: Any, z: Any) -> "MetricAccumulator":
        x_ND, x_hat_ND, z_NF = _tokens(x, "x"), _tokens(x_hat, "x_hat"), _tokens(z, "z")
        if x_ND.shape != x_hat_ND.shape or x_ND.shape[0] != z_NF.shape[0]:
            raise ValueError(f"shapes disagree: x {tuple(x_ND.shape)}, x_hat {tuple(x_hat_ND.shape)}, "
                             f"z {tuple(z_NF.shape)} (need the same tokens and x, x_hat the same width)")
        if x_ND.shape[0] == 0:
            return self
        x_ND, x_hat_ND = x_ND.to(torch.float64), x_hat_ND.to(x_ND.device, torch.float64)
        batch = MetricAccumulator()
        batch.n_tokens = x_ND.shape[0]
        mean_D = x_ND.mean(dim=0)
        batch.mean_D = mean_D.cpu().numpy()
        batch.centered_sq = float((x_ND - mean_D).pow(2).sum())
        batch.err_sq = float((x_ND - x_hat_ND).pow(2).sum())
        norms = x_ND.norm(dim=1) * x_hat_ND.norm(dim=1)
        dots = (x_ND * x_hat_ND).sum(dim=1)
        # A zero vector has no direction: its cosine counts as 0.
        batch.cos_sum = float(torch.where(norms > 0, dots / torch.where(norms > 0, norms, 1.0), 0.0).sum())
        fires_NF = z_NF != 0
        batch.fire_counts = fires_NF.sum(dim=0, dtype=torch.int64).cpu().numpy()
        batch.nonzero = int(batch.fire_counts.sum())
        return self.merge(batch)

    def merge(self, other: "MetricAccumulator") -> "MetricAccumulator":
        """Fold ``other`` into this accumulator (in place) and return self."""
        if other.n_tokens == 0:
            return self
        if self.n_tokens == 0:
            self.__dict__.update({k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in other.__dict__.items()})
            return self
        if other.mean_D.shape != self.mean_D.shape or other.fire_counts.shape != self.fire_counts.shape:
            raise ValueError(f"cannot merge metrics over width {other.mean_D.shape[0]} / {other.fire_counts.shape[0]} "
                             f"latents into width {self.mean_D.shape[0]} / {self.fire_counts.shape[0]} latents")
        n_a, n_b = self.n_tokens, other.n_tokens
        n = n_a + n_b
        delta_D = other.mean_D - self.mean_D
        self.centered_sq += other.centered_sq + float(delta_D @ delta_D) * n_a * n_b / n
        self.mean_D = self.mean_D + delta_D * (n_b / n)
        self.n_tokens = n
        self.err_sq += other.err_sq
        self.cos_sum += other.cos_sum
        self.nonzero += other.nonzero
        self.fire_counts = self.fire_counts + other.fire_counts
        return self

    def result(self) -> dict[str, float]:
        """``{"fvu", "l0", "cs"}``; FVU is NaN when the tokens have no variance."""
        if self.n_tokens == 0:
            raise ValueError("no tokens seen")
        fvu = self.err_sq / self.centered_sq if self.centered_sq > 0 else float("nan")
        return {"fvu": fvu, "l0": self.nonzero / self.n_tokens, "cs": self.cos_sum / self.n_tokens}

    def firing_rate(self) -> np.ndarray:
        """[F] fraction of tokens on which each latent fired (0 = dead over this data)."""
        if self.n_tokens == 0:
            raise ValueError("no tokens seen")
        return self.fire_counts / self.n_tokens


def sae_metrics(x: Any, x_hat: Any, z: Any) -> dict[str, float]:
    """FVU = Σ‖x−x̂‖² / Σ‖x−x̄‖², L0 = mean non-zero latents per token, CS = mean cos(x, x̂)."""
    return MetricAccumulator().update(x, x_hat, z).result()
