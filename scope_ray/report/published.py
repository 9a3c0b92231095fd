"""The paper's published numbers, keyed by this project's registry names, each with where it is printed.

Sources: the supplementary material (``/work/shared/paper/supplementary.txt``: Tables 4, 6, 7, 8,
9) and, for the main paper's Table 3, METHOD.md §12. The linear-probe numbers (Table 3 and supp.
Table 8) live in :data:`scope_ray.report.probes.PUBLISHED` and are re-exported here, not copied.

They are comparable with a run only when it used the pretrained weights and the paper's data
(ImageNet-1K, ADE20K, NYUd); see :func:`scope_ray.report.content.comparability`.
"""

from __future__ import annotations

from scope_ray.report.probes import PUBLISHED as PROBES  # Table 3 (main) and supp. Table 8

# How the paper names each registry model (its row labels).
PAPER_NAME: dict[str, str] = {
    "clip-vit-b16": "CLIP-B/16", "clip-vit-l14": "CLIP-L/14", "clip-vit-l14-336": "CLIP-L/14-336px",
    "dinov2-b": "DINOv2-B", "dinov2-l": "DINOv2-L", "dinov2-g": "DINOv2-G",
    "deit3-s": "DeiT3-S", "deit3-b": "DeiT3-B", "deit3-l": "DeiT3-L",
    "siglip2-b": "SigLIP2-B", "siglip2-l": "SigLIP2-L", "siglip2-g": "SigLIP2-G",
}

# The main paper's Table 3 as METHOD.md §12 quotes it (the main text itself is not held here).
PROBES_SOURCE = {
    "clip-vit-b16": "main Table 3", "clip-vit-l14": "main Table 3",
    "dinov2-b": "supp. Table 8", "deit3-b": "supp. Table 8", "siglip2-b": "supp. Table 8",
}

# Supp. Table 5 (§A.2): the designated layer (1-based) of the other ViTs. The supplement states no layer
# for the CLIP models (Table 5 lists "the additional ViT architectures" only; the main text is not held
# here): None. This project's CLIP default, the penultimate block (11 / 23 / 23), is a decision
# (METHOD.md §1): removal edits patch tokens only, so at the last block it could never reach CLIP's
# class-token image embedding and zero-shot would show no effect by construction.
LAYER_SOURCE = "supp. Table 5"
LAYER: dict[str, int | None] = {
    "clip-vit-b16": None, "clip-vit-l14": None, "clip-vit-l14-336": None,
    "dinov2-b": 11, "dinov2-l": 23, "dinov2-g": 40,
    "deit3-s": 10, "deit3-b": 9, "deit3-l": 18,
    "siglip2-b": 12, "siglip2-l": 24, "siglip2-g": 27,
}

# Supp. Table 4 (§A.1): SAE dictionary size, γ and the low / high-CDS partition of the CLIP SAEs.
PARTITION_SOURCE = "supp. Table 4"
PARTITION: dict[str, dict[str, float]] = {
    "clip-vit-b16": {"dictionary_size": 24576, "gamma": 0.14, "low_cds": 17329, "high_cds": 7247},
    "clip-vit-l14": {"dictionary_size": 32768, "gamma": 0.20, "low_cds": 27887, "high_cds": 4881},
    "clip-vit-l14-336": {"dictionary_size": 32768, "gamma": 0.13, "low_cds": 22323, "high_cds": 10445},
}

# Supp. Table 6 (§B): SAE reconstruction on ImageNet-1K val, all tokens (A) and outliers (O).
SAE_EVAL_SOURCE = "supp. Table 6"
_T6 = ("fvu_all", "fvu_outlier", "l0_all", "l0_outlier", "cs_all", "cs_outlier")
SAE_EVAL: dict[str, dict[str, float]] = {name: dict(zip(_T6, values)) for name, values in {
    "clip-vit-b16": (0.099, 0.021, 30.201, 13.064, 0.923, 0.998),
    "clip-vit-l14": (0.176, 0.042, 29.307, 14.170, 0.873, 0.999),
    "clip-vit-l14-336": (0.115, 0.028, 29.654, 16.391, 0.913, 0.999),
    "dinov2-b": (0.039, 0.001, 29.425, 7.298, 0.911, 0.999),
    "dinov2-l": (0.115, 0.001, 30.416, 15.334, 0.917, 0.999),
    "dinov2-g": (0.062, 0.002, 30.664, 28.709, 0.912, 0.999),
    "deit3-s": (0.123, 0.081, 32.067, 20.318, 0.941, 0.956),
    "deit3-b": (0.215, 0.101, 32.293, 10.208, 0.900, 0.940),
    "deit3-l": (0.170, 0.096, 31.533, 16.113, 0.930, 0.953),
    "siglip2-b": (0.030, 0.001, 29.982, 13.183, 0.948, 0.999),
    "siglip2-l": (0.042, 0.001, 29.628, 13.573, 0.925, 0.999),
    "siglip2-g": (0.116, 0.001, 30.144, 10.202, 0.918, 0.999),
}.items()}

# Mean attention EMD (patches) of non-outlier / outlier tokens per SCC shift s: {model: {s: (D_non, D_out)}}.
# Supp. Table 7 (§D.1, s = 1) names the families only; §A.2 says every mechanistic analysis uses the
# Base-scale models, so its rows are dinov2-b, deit3-b and siglip2-b. Supp. Table 9 (§E) is the s
# sweep on CLIP-ViT-L/14-336px.
INSTABILITY_SOURCE = {"dinov2-b": "supp. Table 7", "deit3-b": "supp. Table 7", "siglip2-b": "supp. Table 7",
                      "clip-vit-l14-336": "supp. Table 9"}
INSTABILITY: dict[str, dict[int, tuple[float, float]]] = {
    "dinov2-b": {1: (0.61, 6.96)},
    "deit3-b": {1: (0.38, 5.97)},
    "siglip2-b": {1: (3.75, 7.18)},
    "clip-vit-l14-336": {1: (1.490, 5.179), 2: (1.745, 6.752), 3: (1.842, 6.869), 4: (1.855, 6.876),
                         5: (1.915, 5.811), 6: (1.958, 5.533)},
}

# The zero-shot result is stated only qualitatively (abstract): there is no number to compare with.
ZEROSHOT: dict[str, dict] = {}
