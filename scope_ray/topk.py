"""Per-feature top-k images, kept in O(q·k) memory while images stream past (METHOD §5 step 1).

Pure NumPy (no Ray). The CDS stage needs, for each of q SAE features, the k images on which the
feature fires most strongly (max activation over an image's patch tokens). Holding the [images, q]
matrix is out of the question at ImageNet scale, so every model actor keeps a running
``FeatureTopK`` and the driver merges what the actors report into its own.

Images are identified by a 63-bit key (``image_key``: a hash of the image id) so that state is
plain integer arrays. The order is total and independent of arrival order: larger value first,
then smaller key. Hence the merged result does not depend on how images were split over actors or
batches, and an image reported twice (a retried batch, a restarted actor) is counted once.
"""

from __future__ import annotations

import hashlib

import numpy as np

NO_KEY = -1  # an empty slot: value -inf, key -1


def image_key(image_id: str) -> int:
    """A stable non-negative 63-bit key for an image id (same on every machine and run)."""
    digest = hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def image_keys(image_ids) -> np.ndarray:
    return np.fromiter((image_key(str(i)) for i in image_ids), dtype=np.int64, count=len(image_ids))


def merge_topk(values_QK: np.ndarray, keys_QK: np.ndarray, new_values_QM: np.ndarray, new_keys_QM: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge candidates into per-row top-k lists.

    Rows are features. Each image key appears at most once per row in the result (its largest
    value); rows are ordered by value descending, then key ascending; slots without a candidate
    hold (-inf, NO_KEY). Candidates with a non-finite or non-positive value are ignored (a feature
    that does not fire on an image does not select it).
    Returns (values_Qk, keys_Qk).
    """
    q = values_QK.shape[0]
    if new_values_QM.shape != new_keys_QM.shape or new_values_QM.shape[0] != q:
        raise ValueError(f"candidates must be [q={q}, M] values and keys, got {new_values_QM.shape} and {new_keys_QM.shape}")
    new_values = np.where(np.isfinite(new_values_QM) & (new_values_QM > 0), new_values_QM, -np.inf).astype(np.float64)
    vals = np.concatenate([values_QK.astype(np.float64), new_values], axis=1)
    keys = np.concatenate([keys_QK, new_keys_QM.astype(np.int64)], axis=1)
    keys = np.where(np.isfinite(vals), keys, NO_KEY)
    # 1) One entry per (row, key): group by key, best value first, and drop the rest of each group.
    order = np.lexsort((-vals, keys), axis=-1)
    vals, keys = (np.take_along_axis(a, order, axis=1) for a in (vals, keys))
    dup = np.zeros_like(keys, dtype=bool)
    dup[:, 1:] = keys[:, 1:] == keys[:, :-1]
    vals = np.where(dup | (keys == NO_KEY), -np.inf, vals)
    # 2) The k best by (value desc, key asc).
    order = np.lexsort((keys, -vals), axis=-1)[:, :k]
    vals, keys = (np.take_along_axis(a, order, axis=1) for a in (vals, keys))
    keys = np.where(np.isfinite(vals), keys, NO_KEY)
    if vals.shape[1] < k:  # fewer candidates than k in total: pad with empty slots
        pad = k - vals.shape[1]
        vals = np.pad(vals, ((0, 0), (0, pad)), constant_values=-np.inf)
        keys = np.pad(keys, ((0, 0), (0, pad)), constant_values=NO_KEY)
    return vals, keys


class FeatureTopK:
    """Running top-k images for each of q features: values_QK (float64) and keys_QK (int64)."""

    def __init__(self, q: int, k: int):
        if q < 1 or k < 1:
            raise ValueError(f"need q >= 1 features and k >= 1 images, got q={q}, k={k}")
        self.q, self.k = q, k
        self.values = np.full((q, k), -np.inf)
        self.keys = np.full((q, k), NO_KEY, dtype=np.int64)

    def update(self, max_acts_BQ: np.ndarray, keys_B: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Offer B images (their per-feature max activation and keys). Returns every top-k entry
        that belongs to one of these B images, as (feature_E, key_E, value_E): what an actor
        reports to the driver. Reporting the batch's held entries (not only the newly entered ones)
        keeps a batch that runs twice on the same actor (Ray rebuilding a lost block) from
        reporting nothing the second time; the driver drops the duplicates."""
        max_acts_BQ = np.asarray(max_acts_BQ)
        keys_B = np.asarray(keys_B, dtype=np.int64)
        if max_acts_BQ.ndim != 2 or max_acts_BQ.shape[1] != self.q or keys_B.shape != (max_acts_BQ.shape[0],):
            raise ValueError(f"expected max_acts [B, q={self.q}] and keys [B], got {max_acts_BQ.shape} and {keys_B.shape}")
        cand_v = max_acts_BQ.T
        cand_k = np.broadcast_to(keys_B, cand_v.shape)
        self.values, self.keys = merge_topk(self.values, self.keys, cand_v, cand_k, self.k)
        feat, slot = np.nonzero(np.isin(self.keys, keys_B) & (self.keys != NO_KEY))
        return feat.astype(np.int64), self.keys[feat, slot], self.values[feat, slot]

    def offer(self, feature_E: np.ndarray, key_E: np.ndarray, value_E: np.ndarray) -> None:
        """Merge entries reported as (feature, key, value) triples, e.g. by the actors."""
        feature_E = np.asarray(feature_E, dtype=np.int64)
        if feature_E.size == 0:
            return
        if feature_E.min() < 0 or feature_E.max() >= self.q:
            raise ValueError(f"feature index out of range 0..{self.q - 1}")
        # Lay the triples out as one candidate column block per feature (padded with empties).
        order = np.argsort(feature_E, kind="stable")
        f_sorted = feature_E[order]
        counts = np.bincount(f_sorted, minlength=self.q)
        width = int(counts.max())
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        col = np.arange(f_sorted.size) - starts[f_sorted]
        cand_v = np.full((self.q, width), -np.inf)
        cand_k = np.full((self.q, width), NO_KEY, dtype=np.int64)
        cand_v[f_sorted, col] = np.asarray(value_E, dtype=np.float64)[order]
        cand_k[f_sorted, col] = np.asarray(key_E, dtype=np.int64)[order]
        self.values, self.keys = merge_topk(self.values, self.keys, cand_v, cand_k, self.k)

    def counts(self) -> np.ndarray:
        """Images held per feature [q]."""
        return (self.keys != NO_KEY).sum(axis=1)
