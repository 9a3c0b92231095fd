"""Token tables: which patch tokens an image contributes, and the Parquet schema they are stored in.

Pure NumPy/pyarrow (no Ray, no torch) so the sampling rule and the schema are testable in
milliseconds. docs/storage.md documents the columns.
"""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa

# Every stage's ``rejects`` table has this one schema, so ROOT/tables/rejects/ reads as one dataset
# across stages; ``task`` is the probe task for probe-features' rejects, null elsewhere.
REJECTS_SCHEMA = pa.schema(
    [
        pa.field("split", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=True),
    ]
)


def token_schema(width: int) -> pa.Schema:
    """One row per patch token: its image, flat row-major grid position, L2 norm and activation."""
    return pa.schema(
        [
            pa.field("image_id", pa.string(), nullable=False),
            pa.field("position", pa.int32(), nullable=False),
            pa.field("norm", pa.float32(), nullable=False),
            pa.field("activation", pa.list_(pa.float32(), width), nullable=False),
        ]
    )


def sample_positions(image_id: str, num_patches: int, n: int, seed: int) -> np.ndarray:
    """``n`` distinct patch positions for one image, sorted.

    Seeded by (seed, image id) rather than by a stream position, so the choice for an image is the
    same however the dataset is sharded, batched or retried.
    """
    if not 1 <= n <= num_patches:
        raise ValueError(f"cannot sample {n} of {num_patches} patches")
    rng = np.random.default_rng([seed, zlib.crc32(image_id.encode())])
    return np.sort(rng.choice(num_patches, size=n, replace=False))


def token_table(image_ids: list[str], positions_BK: np.ndarray, acts_BKD: np.ndarray, norms_BK: np.ndarray) -> pa.Table:
    """Rows for ``K`` tokens of each of ``B`` images (K = all patches or a sample)."""
    b, k, d = acts_BKD.shape
    flat = np.ascontiguousarray(acts_BKD, dtype=np.float32).reshape(-1)
    activation = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float32()), d)
    return pa.Table.from_arrays(
        [
            pa.array(np.repeat(np.asarray(image_ids, dtype=object), k), type=pa.string()),
            pa.array(positions_BK.reshape(-1).astype(np.int32)),
            pa.array(norms_BK.reshape(-1).astype(np.float32)),
            activation,
        ],
        schema=token_schema(d),
    )


def activations_of(table: pa.Table) -> np.ndarray:
    """The ``activation`` column as a [rows, d] float32 array (zero-copy where Arrow allows)."""
    col = table.column("activation").combine_chunks()
    d = col.type.list_size
    return col.values.to_numpy(zero_copy_only=False).reshape(-1, d)


def rejects_table(split: str, image_ids: list[str], reasons: list[str], task: str | None = None) -> pa.Table:
    """Rows of a stage's ``rejects`` table: one per image that could not be used, with why."""
    return pa.table({"split": [split] * len(image_ids), "image_id": list(image_ids), "reason": [str(r) for r in reasons],
                     "task": [task] * len(image_ids)}, schema=REJECTS_SCHEMA)

