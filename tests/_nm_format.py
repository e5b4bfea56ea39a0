"""Test helper: an independent NumPy implementation of the jaxlab.nm compressed N:M format."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

BITS = {2: 1, 4: 2, 8: 4, 16: 4}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NMC:
    """Duck-typed stand-in for jaxlab.nm.NMCompressed (same children and static fields)."""

    values: object
    indices: object
    n: int = dataclasses.field(metadata=dict(static=True))
    m: int = dataclasses.field(metadata=dict(static=True))
    axis: int = dataclasses.field(metadata=dict(static=True))
    shape: tuple = dataclasses.field(metadata=dict(static=True))
    dtype: object = dataclasses.field(metadata=dict(static=True))


def np_compress(w: np.ndarray, n: int, m: int):
    """Keep the n largest |w| of every m consecutive rows; return (compressed, w * mask)."""
    k, cols = w.shape
    groups = w.reshape(k // m, m, cols)
    mag = np.abs(groups.astype(np.float64))
    keep = np.sort(np.argsort(-mag, axis=1, kind="stable")[:, :n], axis=1)  # (G, n, C) ascending
    vals = np.take_along_axis(groups, keep, axis=1).reshape(-1, cols)
    bits = BITS[m]
    q = 8 // bits
    ent = keep.reshape(-1, cols).astype(np.uint8)
    rows = -(-ent.shape[0] // q)
    ent = np.concatenate([ent, np.zeros((rows * q - ent.shape[0], cols), np.uint8)])
    ent = ent.reshape(rows, q, cols)
    packed = np.zeros((rows, cols), np.uint8)
    for s in range(q):
        packed |= (ent[:, s] << (bits * s)).astype(np.uint8)
    mask = np.zeros(groups.shape, bool)
    np.put_along_axis(mask, keep, True, axis=1)
    pruned = np.where(mask.reshape(k, cols), w, 0)
    c = NMC(jnp.asarray(vals), jnp.asarray(packed), n, m, 0, (k, cols), vals.dtype)
    return c, pruned


