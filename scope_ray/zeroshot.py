"""Zero-shot classification with a CLIP text tower (METHOD §10): no Ray here.

Shape names: B images, C classes, E the joint image-text embedding width, M prompts.

The usual CLIP recipe (Radford et al. 2021, and open_clip's ``build_zero_shot_classifier``):
each class's prompts (one per template) go through the text tower, each prompt embedding is
L2-normalised, the class embedding is their mean, renormalised. An image's logits are
``logit_scale * normalise(image) @ class^T`` with the model's own learned ``logit_scale``
(``exp`` of the stored parameter), so the softmax confidence is the one CLIP itself would report.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

Tokenizer = Callable[[list[str]], Tensor]  # prompts -> token ids [M, context_length]


def prompts(templates: Sequence[str], class_names: Sequence[str]) -> list[str]:
    """Class-major prompts: ``templates[t].format(class_names[c])`` at index ``c * T + t``."""
    if not templates or not class_names:
        raise ValueError(f"need templates and class names, got {len(templates)} and {len(class_names)}")
    for t in templates:
        if t.count("{}") != 1:
            raise ValueError(f"template {t!r} must contain exactly one '{{}}'")
    return [t.replace("{}", name) for name in class_names for t in templates]


def clip_tokenizer(model: nn.Module, arch: str) -> Tokenizer:
    """open_clip's tokenizer for ``arch`` at the model's context length (the bundled BPE vocabulary
    for the OpenAI-style configs: works offline)."""
    import open_clip

    return open_clip.get_tokenizer(arch, context_length=int(model.context_length))


@torch.inference_mode()
def class_embeddings(model: nn.Module, tokenizer: Tokenizer, class_names: Sequence[str], templates: Sequence[str],
                     batch_size: int = 256) -> Tensor:
    """class_CE: unit-norm text embedding per class, float32 on the CPU.

    ``model`` is an open_clip ``CLIP`` (anything with ``encode_text``); prompts are encoded in
    batches of ``batch_size`` on the model's device.
    """
    texts = prompts(templates, class_names)
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start:start + batch_size]).to(device)
        chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    prompt_CTE = torch.cat(chunks).view(len(class_names), len(templates), -1)
    return F.normalize(prompt_CTE.mean(dim=1), dim=-1)


def logit_scale(model: nn.Module) -> float:
    """The model's learned temperature, as CLIP applies it (``exp`` of the stored parameter)."""
    return float(model.logit_scale.detach().exp().reshape(-1)[0])


def zeroshot_logits(image_BE: np.ndarray | Tensor, class_CE: np.ndarray | Tensor, scale: float) -> Tensor:
    """logits_BC = scale * normalise(image) @ class^T (the class rows are normalised here too)."""
    # Copies: arrays from Arrow or the Ray object store are read-only, which torch warns about.
    image = torch.from_numpy(np.array(image_BE, dtype=np.float32)) if isinstance(image_BE, np.ndarray) else image_BE
    cls = torch.from_numpy(np.array(class_CE, dtype=np.float32)) if isinstance(class_CE, np.ndarray) else class_CE
    if image.ndim != 2 or cls.ndim != 2 or image.shape[1] != cls.shape[1]:
        raise ValueError(f"expected image [B, E] and class [C, E] embeddings, got {list(image.shape)} and {list(cls.shape)}")
    return scale * F.normalize(image.float(), dim=-1) @ F.normalize(cls.float(), dim=-1).T


@dataclass
class ZeroShotTally:
    """Mergeable running counts for one variant: top-1 hits and the sum of max-softmax confidences."""

    n: int = 0
    correct: int = 0
    confidence_sum: float = 0.0

    def update(self, logits_BC: Tensor, labels_B: np.ndarray | Tensor) -> "ZeroShotTally":
        labels = torch.as_tensor(np.asarray(labels_B, dtype=np.int64))
        c = logits_BC.shape[1]
        if labels.ndim != 1 or labels.shape[0] != logits_BC.shape[0]:
            raise ValueError(f"{labels.shape[0] if labels.ndim else 0} labels for {logits_BC.shape[0]} images")
        bad = labels[(labels < 0) | (labels >= c)]
        if bad.numel():
            raise ValueError(f"label {int(bad[0])} is outside the {c} class names (0..{c - 1}); "
                             "set zeroshot.class_names to the dataset's full class list")
        probs_BC = logits_BC.double().softmax(dim=-1)
        conf_B, pred_B = probs_BC.max(dim=-1)
        self.n += int(labels.shape[0])
        self.correct += int((pred_B == labels).sum())
        self.confidence_sum += float(conf_B.sum())
        return self

    def merge(self, other: "ZeroShotTally") -> "ZeroShotTally":
        return ZeroShotTally(self.n + other.n, self.correct + other.correct, self.confidence_sum + other.confidence_sum)

    @property
    def top1(self) -> float:
        return self.correct / self.n if self.n else float("nan")

    @property
    def mean_confidence(self) -> float:
        return self.confidence_sum / self.n if self.n else float("nan")
