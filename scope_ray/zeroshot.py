"""Zero-shot classification with a CLIP text tower (METHOD §10): no Ray here.

Shape names: B images, C classes, E the joint image-text embedding width, M prompts.

The usual CLIP recipe (Radford et al. 2021, and open_clip's ``build_zero_shot_classifier``):
each class's prompts (one per template) go through the text tower, each prompt embedding is
L2-normalised, the class embedding is their mean, renormalised. An image's logits are
``logit_scale * normalise(image) @ class^T`` with the model's own learned ``logit_scale``
(``exp`` of the stored parameter), so the softmax confidence is the one CLIP itself would report.

Image embeddings (``zeroshot.image_embedding``): ``class_token`` is CLIP's own ``encode_image``
(for the OpenAI CLIPs the final class token through ``ln_post`` and ``proj``); ``patch_mean`` (our
addition, not the paper's protocol) is ``mean_n(ln_post(patch_n)) @ proj``, open_clip's own ``avg``
pooling. Removal edits patch tokens only, so with the designated layer = the last block only
``patch_mean`` can see it. The probe-features cache already holds ``mean_n(ln_post(patch_n))``
(the classification ``embedding``: the wrapper's final tokens are ``ln_post``'s per-token output),
and ``proj`` is linear, so ``patch_mean`` is that column through ``proj``: no second backbone pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

Tokenizer = Callable[[list[str]], Tensor]  # prompts -> token ids [M, context_length]
IMAGE_EMBEDDINGS = ("class_token", "patch_mean")


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


def _visual(model: nn.Module) -> nn.Module:
    return getattr(model, "visual", model)


def patch_mean_projection(model: nn.Module) -> np.ndarray:
    """proj_DE (float32, CPU) that takes the mean of ``ln_post``'d patch tokens to the joint space.

    ``model`` is an open_clip ``CLIP`` or its ``visual``. Only towers that apply ``ln_post`` per
    token before pooling (no attentional pooler, ``final_ln_after_pool`` off, as the wrapper's
    ``final_tokens`` requires too) qualify: there the mean commutes with nothing but ``proj``.
    A tower without ``proj`` gets the identity (its embedding is the pooled token itself).
    """
    visual = _visual(model)
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "final_ln_after_pool", False):
        raise NotImplementedError("patch_mean needs an image tower that applies ln_post per token before pooling "
                                  "(no attentional pooler, final_ln_after_pool off)")
    proj = getattr(visual, "proj", None)
    if proj is None:
        return np.eye(int(visual.transformer.width), dtype=np.float32)
    return proj.detach().float().cpu().numpy().copy()


def patch_mean_embedding(patch_mean_BD: np.ndarray | Tensor, proj_DE: np.ndarray | Tensor) -> Tensor:
    """image_BE = ``mean_n(ln_post(patch_n)) @ proj`` from the cached per-image mean (float32, CPU)."""
    mean = torch.from_numpy(np.array(patch_mean_BD, dtype=np.float32)) if isinstance(patch_mean_BD, np.ndarray) \
        else patch_mean_BD.float().cpu()
    proj = torch.from_numpy(np.array(proj_DE, dtype=np.float32)) if isinstance(proj_DE, np.ndarray) \
        else proj_DE.float().cpu()
    if mean.ndim != 2 or proj.ndim != 2 or mean.shape[1] != proj.shape[0]:
        raise ValueError(f"expected a patch mean [B, D] and a projection [D, E], got {list(mean.shape)} "
                         f"and {list(proj.shape)}")
    return mean @ proj


def removal_invisible(model: nn.Module, layer: int, image_embedding: str) -> bool:
    """Whether every removal variant's image embedding equals ``original`` by construction: CLIP's
    own embedding pooled from the class token, with the designated layer the last block (removal
    edits patch tokens only and no block runs after it). ``patch_mean`` always sees removal."""
    if image_embedding not in IMAGE_EMBEDDINGS:
        raise ValueError(f"image_embedding {image_embedding!r}; allowed: {', '.join(IMAGE_EMBEDDINGS)}")
    visual = _visual(model)
    return (image_embedding == "class_token" and layer == len(visual.transformer.resblocks)
            and getattr(visual, "pool_type", None) == "tok" and getattr(visual, "attn_pool", None) is None)


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
