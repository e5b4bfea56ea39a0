"""Unsupervised identification of a spurious residual-stream subspace from a naive LoRA fine-tune.

For every adapted module with LoRA factors ``A (d_in, r)``, ``B (r, d_out)`` and scale ``s`` the update
``dW = s A B`` has a thin SVD obtained without forming ``dW``:

.. math::
    A = Q_a R_a,\\quad B^T = Q_b R_b,\\quad s R_a R_b^T = U_c \\Sigma V_c^T
    \\;\\Rightarrow\\; dW = (Q_a U_c)\\, \\Sigma\\, (Q_b V_c)^T .

The residual-side singular vectors are kept (input side ``Q_a U_c`` for readers, output side
``Q_b V_c`` for writers) and aggregated with unit energy per module,

.. math::
    C = \\sum_{m} \\sum_i w_{m,i}\\, v_{m,i} v_{m,i}^T,\\qquad w_{m,i} = \\sigma_{m,i}^2 / \\lVert dW_m \\rVert_F^2,

and the top-``k`` eigenvectors of ``C`` form ``U (d_model, k)``. ``k`` defaults to the largest eigengap
``lambda_j / lambda_{j+1}`` among ``j <= max_k``. The factor is only identifiable when it is the dominant
direction shared by the modules; the result reports the eigengap and the explained energy so a caller can
tell (``result.trustworthy``).

Reference: Gilligan-Lee, Egan, Zhu, O'Riordan, arXiv 2605.27676 (GRASP); ``specs/grasp.md`` sec. 2.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.transforms.residual_sides import READER, as_residual_sides, path_str

__all__ = ["SpuriousSubspace", "identify_spurious_subspace", "lora_svd"]


@dataclasses.dataclass(frozen=True)
class SpuriousSubspace:
    """The result of :func:`identify_spurious_subspace`.

    Attributes:
      U: ``(d_model, k)`` orthonormal basis of the global spurious subspace.
      eigenvalues: the spectrum of the aggregated matrix ``C`` (descending; sums to the number of modules
        with ``weighting="energy"``).
      k: number of directions kept.
      eigengap: ``lambda_k / lambda_{k+1}`` (``inf`` when ``lambda_{k+1} = 0``; ``nan`` when ``k = 0``).
      explained_energy: ``sum_{j<=k} lambda_j / sum_j lambda_j``.
      aggregation: ``"global"`` or ``"per_layer"``.
      layer_ids: block indices of ``U_layers`` (per-layer aggregation), else ``None``.
      U_layers: ``(L, d_model, k)`` per-layer bases, else ``None``.
      layer_eigengaps / layer_explained_energy: per-layer diagnostics, else ``None``.
      module_singular_values: ``{module path: singular values of s A B}``.
      min_eigengap: the eigengap threshold used by :attr:`trustworthy`.
    """

    U: jax.Array
    eigenvalues: np.ndarray
    k: int
    eigengap: float
    explained_energy: float
    aggregation: str = "global"
    layer_ids: tuple[int, ...] | None = None
    U_layers: jax.Array | None = None
    layer_eigengaps: np.ndarray | None = None
    layer_explained_energy: np.ndarray | None = None
    module_singular_values: dict = dataclasses.field(default_factory=dict)
    min_eigengap: float = 2.0

    @property
    def d_model(self) -> int:
        return int(self.U.shape[0])

    @property
    def trustworthy(self) -> bool:
        """``eigengap >= min_eigengap``: the kept directions stand clearly above the rest."""
        return bool(self.k > 0 and self.eigengap >= self.min_eigengap)

    def summary(self) -> str:
        top = ", ".join(f"{v:.3g}" for v in self.eigenvalues[: max(self.k + 2, 4)])
        verdict = "trustworthy" if self.trustworthy else "NOT trustworthy (eigengap below threshold)"
        return (
            f"SpuriousSubspace(d_model={self.d_model}, k={self.k}, aggregation={self.aggregation}, "
            f"eigengap={self.eigengap:.3g}, explained_energy={self.explained_energy:.3f}, "
            f"top eigenvalues [{top}], {len(self.module_singular_values)} modules): {verdict}"
        )


def lora_svd(a, b, scale: float = 1.0):
    """Thin SVD of ``dW = scale * a @ b`` via two QRs and an ``r x r`` SVD (never forms ``dW``).

    .. math:: a = Q_a R_a,\\ b^T = Q_b R_b,\\ \\text{scale}\\, R_a R_b^T = U_c \\Sigma V_c^T,\\
              dW = (Q_a U_c) \\Sigma (Q_b V_c)^T.

    Args:
      a: ``(d_in, r)`` LoRA down factor.
      b: ``(r, d_out)`` LoRA up factor.
      scale: the LoRA scale ``alpha / r`` (or ``alpha / sqrt(r)``).

    Returns:
      ``(left (d_in, r), sigma (r,), right (d_out, r))`` in float64 numpy, ``sigma`` descending.

    Example:
      >>> left, s, right = lora_svd(np.ones((4, 1)), np.ones((1, 3)))
      >>> round(float(s[0]), 4)   # ||1_4 1_3^T||_2 = sqrt(12)
      3.4641
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"lora_svd: expected a (d_in, r) and b (r, d_out); got {a.shape} and {b.shape}")
    qa, ra = np.linalg.qr(a)
    qb, rb = np.linalg.qr(b.T)
    uc, s, vct = np.linalg.svd(scale * ra @ rb.T)
    return qa @ uc, s, qb @ vct.T


def _weights(s: np.ndarray, weighting: str) -> np.ndarray:
    if weighting == "energy":
        tot = float(np.sum(s**2))
        return s**2 / tot if tot > 0 else np.zeros_like(s)
    if weighting == "sigma":
        tot = float(np.sum(s))
        return s / tot if tot > 0 else np.zeros_like(s)
    if weighting == "uniform":
        return np.where(s > 0, 1.0 / max(int(np.sum(s > 0)), 1), 0.0)
    raise ValueError(f"identify_spurious_subspace: weighting={weighting!r}; expected 'energy', 'sigma' or 'uniform'")


def _eig(vectors: list[np.ndarray], weights: list[np.ndarray], d: int):
    """Eigen-decomposition of ``C = sum w v v^T`` through the SVD of ``[sqrt(w) v]`` (d x N)."""
    if not vectors:
        return np.zeros((d, 0)), np.zeros((0,))
    m = np.concatenate([v * np.sqrt(w)[None, :] for v, w in zip(vectors, weights)], axis=1)
    u, s, _ = np.linalg.svd(m, full_matrices=False)
    return u, s**2


def _choose_k(lam: np.ndarray, k: int | None, max_k: int) -> int:
    if k is not None:
        return int(k)
    n = int(np.sum(lam > 1e-12 * max(float(lam[0]) if lam.size else 0.0, 1e-300)))
    if n <= 1:
        return n
    upto = min(max_k, n - 1) if n > 1 else 1
    ratios = [lam[j] / lam[j + 1] for j in range(upto)]
    return int(np.argmax(ratios)) + 1 if ratios else 1


def _gap_energy(lam: np.ndarray, k: int) -> tuple[float, float]:
    if k == 0:
        return float("nan"), 0.0
    tot = float(np.sum(lam))
    nxt = float(lam[k]) if lam.size > k else 0.0
    gap = float(lam[k - 1]) / nxt if nxt > 1e-12 * float(lam[0]) else float("inf")
    return gap, float(np.sum(lam[:k])) / tot if tot > 0 else 0.0


def identify_spurious_subspace(
    lora_params,
    *,
    sides=None,
    k: int | None = None,
    aggregation: Literal["global", "per_layer"] = "global",
    max_k: int = 3,
    weighting: Literal["energy", "sigma", "uniform"] = "energy",
    top_per_module: int | None = None,
    scale: float = 1.0,
    min_eigengap: float = 2.0,
) -> SpuriousSubspace:
    """Find the residual-stream directions shared by the updates of a naive LoRA fine-tune.

    .. math::
        C = \\sum_{\\text{modules } m} \\sum_i w_{m,i}\\, v_{m,i} v_{m,i}^T, \\quad
        w_{m,i} = \\sigma_{m,i}^2 / \\textstyle\\sum_j \\sigma_{m,j}^2, \\quad U = \\operatorname{top}_k \\operatorname{eig}(C),

    with ``v_{m,i}`` the residual-side singular vectors of ``dW_m = s A_m B_m`` (input side for readers,
    output side for writers; see :func:`lora_svd`).

    Args:
      lora_params: a param tree holding ``lora_a (d_in, r)`` / ``lora_b (r, d_out)`` pairs (from
        :func:`jaxlab.lora.inject` or :class:`jaxlab.nn.LoRADense`); leading axes are a layer stack.
      sides: residual-side rules (see :func:`jaxlab.transforms.residual_sides.as_residual_sides`).
      k: number of directions; ``None`` picks the largest eigengap among the first ``max_k``.
      aggregation: ``"global"`` (one ``U``) or ``"per_layer"`` (also ``U_layers``, one per block, same ``k``).
      max_k: upper bound for the automatic ``k``.
      weighting: the ranking rule for singular directions: ``"energy"`` (``sigma^2 / ||dW||_F^2``, the
        spec's default), ``"sigma"`` (``sigma / sum sigma``) or ``"uniform"``.
      top_per_module: keep only each module's top singular directions (default: all ``r``).
      scale: the LoRA scale (only changes the reported singular values; the weights are scale-free).
      min_eigengap: threshold for :attr:`SpuriousSubspace.trustworthy`.

    Returns:
      A :class:`SpuriousSubspace` with ``U``, the spectrum, ``k``, eigengap and explained energy.

    Raises:
      ValueError: no LoRA pair on a declared side, mismatched factor shapes (naming the leaf), residual
        widths that differ between modules, or bad arguments.

    Example:
      >>> res = identify_spurious_subspace(params, sides={r"w_in$": "writer"}, k=1)
      >>> res.U.shape, res.trustworthy
      ((16, 1), True)
    """
    if aggregation not in ("global", "per_layer"):
        raise ValueError(f"identify_spurious_subspace: aggregation={aggregation!r}; expected 'global' or 'per_layer'")
    if k is not None and k < 0:
        raise ValueError(f"identify_spurious_subspace: k={k} must be >= 0")
    rules = as_residual_sides(sides)
    flat = jax.tree_util.tree_flatten_with_path(lora_params)[0]
    modules: dict[str, dict] = {}
    for path, leaf in flat:
        parts = path_str(path).split("/")
        if parts[-1] in ("lora_a", "lora_b"):
            modules.setdefault("/".join(parts[:-1]), {})[parts[-1]] = (path, leaf)

    vecs: list[np.ndarray] = []
    wts: list[np.ndarray] = []
    layers: list[int | None] = []
    module_sv: dict[str, np.ndarray] = {}
    checked = []
    for mod, pair in sorted(modules.items()):
        side = rules.side_of(mod)
        if side is None:
            continue
        if set(pair) != {"lora_a", "lora_b"}:
            missing = ({"lora_a", "lora_b"} - set(pair)).pop()
            raise ValueError(f"identify_spurious_subspace: module {mod!r} has no {missing!r} leaf")
        (pa, a), (pb, b) = pair["lora_a"], pair["lora_b"]
        a = np.asarray(a)
        b = np.asarray(b)
        if a.ndim < 2 or a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
            raise ValueError(
                f"identify_spurious_subspace: LoRA factors {jax.tree_util.keystr(pa)} {a.shape} and "
                f"{jax.tree_util.keystr(pb)} {b.shape} do not fit; expected lora_a (..., d_in, r) and "
                f"lora_b (..., r, d_out)"
            )
        width = a.shape[-2] if side == READER else b.shape[-1]
        checked.append((mod, side, a, b, pa if side == READER else pb, width))
    widths = [c[-1] for c in checked]
    d_model = max(set(widths), key=widths.count) if widths else 0
    for _mod, side, a, b, pleaf, width in checked:
        if width != d_model:
            raise ValueError(
                f"identify_spurious_subspace: {side} leaf {jax.tree_util.keystr(pleaf)} has residual width "
                f"{width} (shape {(a if side == READER else b).shape}); expected d_model={d_model} like the "
                f"other modules (is its side declared correctly?)"
            )
    for mod, side, a, b, _, _ in checked:
        a2 = a.reshape((-1,) + a.shape[-2:])
        b2 = b.reshape((-1,) + b.shape[-2:])
        layer0 = rules.layer_of(mod)
        svs = []
        for i in range(a2.shape[0]):
            left, s, right = lora_svd(a2[i], b2[i], scale)
            v = left if side == READER else right
            w = _weights(s, weighting)
            if top_per_module is not None:
                v, w = v[:, :top_per_module], w[:top_per_module]
            vecs.append(v)
            wts.append(w)
            layers.append(i if a.ndim > 2 else layer0)
            svs.append(s)
        module_sv[mod] = np.stack(svs) if len(svs) > 1 else svs[0]
    if not vecs:
        raise ValueError(
            "identify_spurious_subspace: found no lora_a/lora_b pair in a module with a declared residual "
            f"side; LoRA modules present: {sorted(modules)}; rules: {rules.rules}"
        )

    u, lam = _eig(vecs, wts, d_model)
    kk = _choose_k(lam, k, max_k)
    if kk > d_model:
        raise ValueError(f"identify_spurious_subspace: k={kk} exceeds d_model={d_model}")
    basis = np.zeros((d_model, kk))
    basis[:, : min(kk, u.shape[1])] = u[:, :kk]
    gap, energy = _gap_energy(lam, kk)

    u_layers = layer_ids = l_gaps = l_energy = None
    if aggregation == "per_layer":
        ids = sorted({lyr for lyr in layers if lyr is not None})
        if not ids:
            raise ValueError(
                "identify_spurious_subspace: aggregation='per_layer' but no module path carries a layer index "
                f"(pattern {rules.layer_pattern!r}) and no LoRA leaf is stacked"
            )
        per, gaps, ens = [], [], []
        for lid in ids:
            sel = [i for i, lyr in enumerate(layers) if lyr == lid]
            ul, laml = _eig([vecs[i] for i in sel], [wts[i] for i in sel], d_model)
            b_l = np.zeros((d_model, kk))
            b_l[:, : min(kk, ul.shape[1])] = ul[:, :kk]
            per.append(b_l)
            g, e = _gap_energy(laml, kk)
            gaps.append(g)
            ens.append(e)
        u_layers = jnp.asarray(np.stack(per), jnp.float32)
        layer_ids = tuple(ids)
        l_gaps, l_energy = np.asarray(gaps), np.asarray(ens)

    return SpuriousSubspace(
        U=jnp.asarray(basis, jnp.float32),
        eigenvalues=lam,
        k=kk,
        eigengap=gap,
        explained_energy=energy,
        aggregation=aggregation,
        layer_ids=layer_ids,
        U_layers=u_layers,
        layer_eigengaps=l_gaps,
        layer_explained_energy=l_energy,
        module_singular_values=module_sv,
        min_eigengap=min_eigengap,
    )
