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
tell (``result.trustworthy``, and ``result.reason`` says why not). Adapters without a fine-tune signal
(all updates zero, e.g. ``lora_b = 0`` right after ``inject``) are never trustworthy.

:func:`identify_spurious_subspace` composes four steps, each a function of this module:

1. :func:`collect_lora_modules` / :func:`common_residual_width`: which adapted modules read or write the
   residual stream, and its width ``d_model``;
2. :func:`residual_directions`: per module, the residual-side singular vectors and their weights
   (:func:`lora_svd`, :func:`direction_weights`);
3. :func:`pool_directions`: the spectrum of ``C`` without forming it;
4. :func:`choose_k`, :func:`top_k_basis`, :func:`eigengap_and_energy` (and :func:`per_layer_subspaces`):
   the subspace and its diagnostics.

Reference: Gilligan-Lee, Egan, Zhu, O'Riordan, arXiv 2605.27676 (GRASP), the identification step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.paths import key_path, slash_path
from jaxlab.transforms.residual_sides import LORA_LEAVES, READER, ResidualSides, as_residual_sides

__all__ = [
    "LoraModule",
    "ModuleDirections",
    "SpuriousSubspace",
    "choose_k",
    "collect_lora_modules",
    "common_residual_width",
    "direction_weights",
    "eigengap_and_energy",
    "identify_spurious_subspace",
    "lora_svd",
    "per_layer_subspaces",
    "pool_directions",
    "residual_directions",
    "top_k_basis",
]


@dataclasses.dataclass(frozen=True)
class SpuriousSubspace:
    """The result of :func:`identify_spurious_subspace`.

    Attributes:
      U: ``(d_model, k)`` orthonormal basis of the global spurious subspace.
      eigenvalues: the spectrum of the aggregated matrix ``C`` (descending; sums to the number of modules
        with ``weighting="energy"``).
      k: number of directions kept.
      eigengap: ``lambda_k / lambda_{k+1}`` (``inf`` when ``lambda_{k+1} = 0``; ``nan`` when ``k = 0``, when
        ``lambda_k = 0`` and when there is no fine-tune signal at all, see ``update_norm``).
      explained_energy: ``sum_{j<=k} lambda_j / sum_j lambda_j`` (``0.0`` without a fine-tune signal).
      aggregation: ``"global"`` or ``"per_layer"``.
      layer_ids: block indices of ``U_layers`` (per-layer aggregation), else ``None``.
      U_layers: ``(L, d_model, k)`` per-layer bases, else ``None``.
      layer_eigengaps / layer_explained_energy: per-layer diagnostics, else ``None``.
      module_singular_values: ``{module path: singular values of s A B}``.
      min_eigengap: the eigengap threshold used by :attr:`trustworthy`.
      update_norm: ``sqrt(sum_m ||s A_m B_m||_F^2)`` over the adapted modules (``None``: not measured).
      min_update_norm: at or below this ``update_norm`` the adapters carry no fine-tune signal (the
        per-module unit-energy weights would otherwise blow float noise up into a "direction").
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
    update_norm: float | None = None
    min_update_norm: float = 1e-12

    @property
    def d_model(self) -> int:
        return int(self.U.shape[0])

    @property
    def reason(self) -> str:
        """Why the result is not trustworthy, in words; ``""`` when it is.

        The checks, in order: a fine-tune signal at all (``update_norm > min_update_norm``), ``k > 0``, a
        kept ``k``-th direction with energy (``eigengap`` not ``nan``), ``eigengap >= min_eigengap``.

        Example:
          >>> import numpy as np
          >>> from jaxlab.transforms.grasp_identify import identify_spurious_subspace
          >>> p = {"attn": {"o": {"lora_a": np.ones((4, 2)), "lora_b": np.zeros((2, 8))}}}   # B = 0
          >>> res = identify_spurious_subspace(p, k=1)
          >>> res.trustworthy, res.eigengap, res.reason
          (False, nan, 'all LoRA updates are zero (no fine-tune signal; lora_b = 0 as right after inject?)')
        """
        if self.update_norm is not None and not self.update_norm > self.min_update_norm:
            if self.update_norm == 0:
                return "all LoRA updates are zero (no fine-tune signal; lora_b = 0 as right after inject?)"
            return (
                f"all LoRA updates are numerically zero (update_norm {self.update_norm:.3g} <= "
                f"min_update_norm {self.min_update_norm:.3g}; no fine-tune signal)"
            )
        if self.k == 0:
            return "k = 0: no direction kept"
        if math.isnan(self.eigengap):
            return f"the k={self.k}-th kept direction carries no energy (eigenvalue 0; choose a smaller k)"
        if not self.eigengap >= self.min_eigengap:
            return f"eigengap {self.eigengap:.3g} < min_eigengap {self.min_eigengap:.3g}"
        return ""

    @property
    def trustworthy(self) -> bool:
        """The kept directions stand clearly above the rest (``eigengap >= min_eigengap``) and the adapters
        carry a fine-tune signal; :attr:`reason` says why not."""
        return not self.reason

    def summary(self) -> str:
        top = ", ".join(f"{v:.3g}" for v in self.eigenvalues[: max(self.k + 2, 4)])
        verdict = "trustworthy" if self.trustworthy else f"NOT trustworthy ({self.reason})"
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
      >>> import numpy as np
      >>> from jaxlab.transforms.grasp_identify import lora_svd
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


# ---------------------------------------------------------------- 1. which modules touch the residual stream


@dataclasses.dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted module and the side on which its update ``dW = s A B`` touches the residual stream.

    Attributes:
      path: module path (``"block_0/attn/q"``): the tree path of its LoRA leaves without the leaf name.
      side: ``"reader"`` (residual on the input side, ``lora_a (..., d_model, r)``) or ``"writer"``
        (residual on the output side, ``lora_b (..., r, d_model)``).
      a: ``lora_a`` as a numpy array ``(..., d_in, r)``; leading axes are a layer stack.
      b: ``lora_b`` as a numpy array ``(..., r, d_out)``.
      residual_leaf: ``jax.tree_util.keystr`` of the residual-side factor (``lora_a`` of a reader,
        ``lora_b`` of a writer), for error messages.
      layer: block index parsed from ``path`` (``ResidualSides.layer_of``), or ``None``.
    """

    path: str
    side: str
    a: np.ndarray
    b: np.ndarray
    residual_leaf: str
    layer: int | None

    @property
    def width(self) -> int:
        """The residual width this module sees: ``d_in`` of a reader, ``d_out`` of a writer."""
        return self.a.shape[-2] if self.side == READER else self.b.shape[-1]

    @property
    def stacked(self) -> bool:
        """Whether the factors carry leading layer-stack axes (scanned layers)."""
        return self.a.ndim > 2


def _group_lora_leaves(lora_params) -> dict[str, dict[str, tuple]]:
    """``{module path: {"lora_a": (tree path, leaf), "lora_b": (tree path, leaf)}}`` (a pair may be partial)."""
    grouped: dict[str, dict] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(lora_params)[0]:
        parts = slash_path(path).split("/")
        if parts[-1] in LORA_LEAVES:
            grouped.setdefault("/".join(parts[:-1]), {})[parts[-1]] = (path, leaf)
    return grouped


def collect_lora_modules(lora_params, sides=None) -> list[LoraModule]:
    """The LoRA-adapted modules that read or write the residual stream, sorted by module path.

    In Flax layout a module's update is ``dW = s A B`` with ``A (d_in, r)``, ``B (r, d_out)``, so

    .. math::
        \\operatorname{col}(dW) \\subseteq \\operatorname{col}(A) \\subset \\mathbb{R}^{d_{in}},\\qquad
        \\operatorname{row}(dW) \\subseteq \\operatorname{col}(B^T) \\subset \\mathbb{R}^{d_{out}}:

    a *reader* (``d_in = d_model``: q, k, v, MLP up/gate, unembedding) moves what the module reads from the
    residual stream within ``col(A)``; a *writer* (``d_out = d_model``: attention out, MLP down, embedding)
    writes into the residual stream within ``col(B^T)``. The side comes from the residual-side rules
    matched against the module path; modules no rule claims (or a rule maps to ``None``) are skipped.

    Args:
      lora_params: param tree holding ``lora_a (..., d_in, r)`` / ``lora_b (..., r, d_out)`` pairs.
      sides: residual-side rules (see :func:`jaxlab.transforms.residual_sides.as_residual_sides`).

    Returns:
      One :class:`LoraModule` per adapted module with a declared side.

    Raises:
      ValueError: a declared module lacks ``lora_a`` or ``lora_b``, its factors do not fit
        (naming both leaves and shapes), or no LoRA pair sits in a module with a declared side.

    Example:
      >>> import numpy as np
      >>> from jaxlab.transforms.grasp_identify import collect_lora_modules
      >>> p = {"block_0": {"attn": {"q": {"lora_a": np.ones((8, 2)), "lora_b": np.ones((2, 4))},
      ...                           "o": {"lora_a": np.ones((4, 2)), "lora_b": np.ones((2, 8))}},
      ...                  "ln1": {"lora_a": np.ones((8, 1)), "lora_b": np.ones((1, 8))}}}
      >>> [(m.path, m.side, m.width, m.layer) for m in collect_lora_modules(p)]
      [('block_0/attn/o', 'writer', 8, 0), ('block_0/attn/q', 'reader', 8, 0)]
    """
    rules = as_residual_sides(sides)
    grouped = _group_lora_leaves(lora_params)
    modules = []
    for mod, pair in sorted(grouped.items()):
        side = rules.side_of(mod)
        if side is None:
            continue
        if set(pair) != set(LORA_LEAVES):
            missing = (set(LORA_LEAVES) - set(pair)).pop()
            raise ValueError(f"identify_spurious_subspace: module {mod!r} has no {missing!r} leaf")
        (pa, a), (pb, b) = pair["lora_a"], pair["lora_b"]
        a = np.asarray(a)
        b = np.asarray(b)
        if a.ndim < 2 or a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
            raise ValueError(
                f"identify_spurious_subspace: LoRA factors {key_path(pa)} {a.shape} and "
                f"{key_path(pb)} {b.shape} do not fit; expected lora_a (..., d_in, r) and "
                f"lora_b (..., r, d_out)"
            )
        residual_leaf = key_path(pa if side == READER else pb)
        modules.append(LoraModule(mod, side, a, b, residual_leaf, rules.layer_of(mod)))
    if not modules:
        raise ValueError(
            "identify_spurious_subspace: found no lora_a/lora_b pair in a module with a declared residual "
            f"side; LoRA modules present: {sorted(grouped)}; rules: {rules.rules}"
        )
    return modules


def common_residual_width(modules: list[LoraModule]) -> int:
    """``d_model``: the residual width of the modules (the most common one; any other is an error).

    A module whose residual-side width differs is almost always a module whose side is declared wrongly
    (a reader taken for a writer sees ``d_out``, not ``d_model``).

    Args:
      modules: from :func:`collect_lora_modules`.

    Returns:
      ``d_model`` (``0`` for no modules).

    Raises:
      ValueError: a module's residual width differs, naming its residual-side leaf and shape.

    Example:
      >>> import numpy as np
      >>> from jaxlab.transforms.grasp_identify import collect_lora_modules, common_residual_width
      >>> p = {"attn": {"q": {"lora_a": np.ones((8, 2)), "lora_b": np.ones((2, 4))}}}
      >>> common_residual_width(collect_lora_modules(p))
      8
    """
    widths = [m.width for m in modules]
    d_model = max(set(widths), key=widths.count) if widths else 0
    for m in modules:
        if m.width != d_model:
            raise ValueError(
                f"identify_spurious_subspace: {m.side} leaf {m.residual_leaf} has residual width {m.width} "
                f"(shape {(m.a if m.side == READER else m.b).shape}); expected d_model={d_model} like the "
                f"other modules (is its side declared correctly?)"
            )
    return d_model


# ---------------------------------------------------------------- 2. per-module residual directions


@dataclasses.dataclass(frozen=True)
class ModuleDirections:
    """The residual-side singular directions of one module's update (one slice of a stacked module).

    Attributes:
      module: the module path.
      layer: block index: the slice index of a stacked module, else parsed from the path (or ``None``).
      vectors: ``(d_model, r')`` orthonormal residual-side singular vectors ``v_i``, by descending ``sigma_i``.
      weights: ``(r',)`` their weights ``w_i`` in the pooled matrix ``C`` (:func:`direction_weights`).
      sigma: ``(r,)`` all singular values of ``s A B`` (descending), before any ``top_per_module`` cut.
    """

    module: str
    layer: int | None
    vectors: np.ndarray
    weights: np.ndarray
    sigma: np.ndarray


def direction_weights(sigma: np.ndarray, weighting: str) -> np.ndarray:
    """The weight of each singular direction of one module in the pooled matrix ``C`` (the ranking rule).

    .. math::
        \\text{energy: } w_i = \\frac{\\sigma_i^2}{\\sum_j \\sigma_j^2} = \\frac{\\sigma_i^2}{\\lVert dW \\rVert_F^2},
        \\qquad \\text{sigma: } w_i = \\frac{\\sigma_i}{\\sum_j \\sigma_j},
        \\qquad \\text{uniform: } w_i = \\frac{[\\sigma_i > 0]}{\\#\\{j: \\sigma_j > 0\\}}.

    Each rule gives a module unit total weight (zero for an all-zero update), so no module dominates ``C``
    by the size of its update alone.

    Args:
      sigma: ``(r,)`` singular values of ``dW``.
      weighting: ``"energy"`` (the spec's default), ``"sigma"`` or ``"uniform"``.

    Returns:
      ``(r,)`` non-negative weights.

    Raises:
      ValueError: unknown ``weighting``.

    Example:
      >>> import numpy as np
      >>> from jaxlab.transforms.grasp_identify import direction_weights
      >>> direction_weights(np.array([2.0, 1.0, 0.0]), "energy").tolist()
      [0.8, 0.2, 0.0]
    """
    if weighting == "energy":
        tot = float(np.sum(sigma**2))
        return sigma**2 / tot if tot > 0 else np.zeros_like(sigma)
    if weighting == "sigma":
        tot = float(np.sum(sigma))
        return sigma / tot if tot > 0 else np.zeros_like(sigma)
    if weighting == "uniform":
        return np.where(sigma > 0, 1.0 / max(int(np.sum(sigma > 0)), 1), 0.0)
    raise ValueError(f"identify_spurious_subspace: weighting={weighting!r}; expected 'energy', 'sigma' or 'uniform'")


def residual_directions(
    module: LoraModule, *, scale: float = 1.0, weighting: str = "energy", top_per_module: int | None = None
) -> list[ModuleDirections]:
    """The residual-side singular directions of ``dW = s A B`` and their weights, per layer slice.

    .. math::
        s A B = L \\Sigma R^T \\ (\\text{thin SVD, } :func:`lora_svd`),\\qquad
        v_i = \\begin{cases} L_{:,i} & \\text{reader (input side)} \\\\ R_{:,i} & \\text{writer (output side)} \\end{cases},
        \\qquad w_i = \\text{direction\\_weights}(\\sigma)_i .

    ``top_per_module`` keeps the first (largest-``sigma``) directions. A stacked module gives one entry
    per slice of its flattened leading axes, with ``layer`` the slice index.

    Args:
      module: from :func:`collect_lora_modules`.
      scale: the LoRA scale ``s`` (scales ``sigma``; the weights are scale-free).
      weighting: see :func:`direction_weights`.
      top_per_module: keep only this many directions per slice (``None``: all ``r``).

    Returns:
      One :class:`ModuleDirections` per layer slice.

    Example:
      >>> import numpy as np
      >>> from jaxlab.transforms.grasp_identify import collect_lora_modules, residual_directions
      >>> p = {"mlp": {"down": {"lora_a": np.eye(4)[:, :1], "lora_b": 2.0 * np.eye(3)[:1]}}}  # writer, d_model = 3
      >>> (d,) = residual_directions(collect_lora_modules(p)[0])
      >>> np.abs(d.vectors[:, 0]).tolist(), d.sigma.tolist(), d.weights.tolist()
      ([1.0, 0.0, 0.0], [2.0], [1.0])
    """
    a2 = module.a.reshape((-1,) + module.a.shape[-2:])
    b2 = module.b.reshape((-1,) + module.b.shape[-2:])
    out = []
    for i in range(a2.shape[0]):
        left, s, right = lora_svd(a2[i], b2[i], scale)
        v = left if module.side == READER else right
        w = direction_weights(s, weighting)
        if top_per_module is not None:
            v, w = v[:, :top_per_module], w[:top_per_module]
        out.append(ModuleDirections(module.path, i if module.stacked else module.layer, v, w, s))
    return out


def _module_sigma(directions: list[ModuleDirections]) -> np.ndarray:
    """Singular values of one module: ``(r,)``, or ``(L, r)`` for a stack of ``L > 1`` slices."""
    return np.stack([d.sigma for d in directions]) if len(directions) > 1 else directions[0].sigma


# ---------------------------------------------------------------- 3. pooling across modules


def pool_directions(vectors: list[np.ndarray], weights: list[np.ndarray], d: int) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of the pooled matrix ``C = sum_n w_n v_n v_n^T`` without forming ``C``.

    .. math::
        M = \\big[\\sqrt{w_1}\\, v_1, \\dots, \\sqrt{w_N}\\, v_N\\big] \\in \\mathbb{R}^{d \\times N},\\quad
        C = M M^T,\\quad M = Q S Z^T \\;\\Rightarrow\\; C = Q S^2 Q^T,

    so the eigenvectors of ``C`` are the left singular vectors of ``M`` and its eigenvalues ``S^2``.
    With ``"energy"`` weights every non-zero module contributes trace 1, so ``sum(lambda)`` counts them.

    Args:
      vectors: per module (slice) ``(d, r_n)`` directions.
      weights: per module (slice) ``(r_n,)`` weights.
      d: the residual width (shape of the empty result).

    Returns:
      ``(eigenvectors (d, min(d, N)), eigenvalues (min(d, N),))``, eigenvalues descending.

    Example:
      >>> import numpy as np
      >>> from jaxlab.transforms.grasp_identify import pool_directions
      >>> e = np.eye(3)
      >>> q, lam = pool_directions([e[:, :2], e[:, :1]], [np.array([0.5, 0.5]), np.array([1.0])], 3)
      >>> lam.round(6).tolist(), np.abs(q[:, 0]).round(6).tolist()   # C = 1.5 e0 e0^T + 0.5 e1 e1^T
      ([1.5, 0.5, 0.0], [1.0, 0.0, 0.0])
    """
    if not vectors:
        return np.zeros((d, 0)), np.zeros((0,))
    m = np.concatenate([v * np.sqrt(w)[None, :] for v, w in zip(vectors, weights)], axis=1)
    u, s, _ = np.linalg.svd(m, full_matrices=False)
    return u, s**2


# ---------------------------------------------------------------- 4. the subspace and its diagnostics


def choose_k(lam: np.ndarray, k: int | None, max_k: int) -> int:
    """The number of kept directions: ``k`` if given, else the position of the largest eigengap.

    .. math::
        k^* = \\operatorname*{arg\\,max}_{1 \\le j \\le \\min(\\text{max\\_k},\\, n - 1)} \\lambda_j / \\lambda_{j+1},
        \\qquad n = \\#\\{j : \\lambda_j > 10^{-12} \\lambda_1\\},

    and ``k* = n`` when ``n <= 1`` (nothing to compare).

    Args:
      lam: eigenvalues of ``C``, descending.
      k: a fixed ``k`` (returned as is) or ``None``.
      max_k: upper bound for the automatic choice.

    Returns:
      ``k``.

    Example:
      >>> import numpy as np
      >>> from jaxlab.transforms.grasp_identify import choose_k
      >>> choose_k(np.array([4.0, 3.5, 0.5, 0.4]), None, max_k=3)   # gaps 1.14, 7, 1.25
      2
    """
    if k is not None:
        return int(k)
    n = int(np.sum(lam > 1e-12 * max(float(lam[0]) if lam.size else 0.0, 1e-300)))
    if n <= 1:
        return n
    upto = min(max_k, n - 1) if n > 1 else 1
    ratios = [lam[j] / lam[j + 1] for j in range(upto)]
    return int(np.argmax(ratios)) + 1 if ratios else 1


def top_k_basis(eigvecs: np.ndarray, k: int, d: int) -> np.ndarray:
    """``U (d, k)``: the first ``k`` eigenvectors of ``C``, zero-padded when ``C`` has fewer than ``k``.

    Example:
      >>> import numpy as np
      >>> from jaxlab.transforms.grasp_identify import top_k_basis
      >>> top_k_basis(np.eye(3)[:, :1], 2, 3).tolist()
      [[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    """
    basis = np.zeros((d, k))
    basis[:, : min(k, eigvecs.shape[1])] = eigvecs[:, :k]
    return basis


def eigengap_and_energy(lam: np.ndarray, k: int) -> tuple[float, float]:
    """Identification diagnostics of the top-``k`` subspace of ``C``.

    .. math::
        \\text{eigengap} = \\lambda_k / \\lambda_{k+1}
        \\ (\\infty \\text{ when } \\lambda_{k+1} \\le 10^{-12} \\lambda_1),\\qquad
        \\text{explained energy} = \\textstyle\\sum_{j \\le k} \\lambda_j / \\sum_j \\lambda_j .

    A large eigengap says the kept directions stand clearly above the rest (the factor is the dominant
    shared direction, the condition under which identification works); ``(nan, 0.0)`` for ``k = 0``. The
    eigengap is ``nan`` (not ``inf``) when the ``k``-th kept direction itself has no energy
    (``lambda_k <= 10^{-12} lambda_1``, e.g. an all-zero spectrum): there is no gap to speak of.

    Args:
      lam: eigenvalues of ``C``, descending.
      k: number of kept directions.

    Returns:
      ``(eigengap, explained_energy)``.

    Example:
      >>> import numpy as np
      >>> from jaxlab.transforms.grasp_identify import eigengap_and_energy
      >>> eigengap_and_energy(np.array([4.0, 1.0, 1.0]), 1)
      (4.0, 0.6666666666666666)
      >>> eigengap_and_energy(np.array([0.0, 0.0]), 1)   # no energy at all: no gap (not inf)
      (nan, 0.0)
    """
    if k == 0:
        return float("nan"), 0.0
    tot = float(np.sum(lam))
    top = float(lam[0]) if lam.size else 0.0
    cur = float(lam[k - 1]) if lam.size >= k else 0.0
    nxt = float(lam[k]) if lam.size > k else 0.0
    if not cur > 1e-12 * top or top <= 0:
        gap = float("nan")
    else:
        gap = cur / nxt if nxt > 1e-12 * top else float("inf")
    return gap, float(np.sum(lam[:k])) / tot if tot > 0 else 0.0


def per_layer_subspaces(
    directions: list[ModuleDirections], k: int, d: int, layer_pattern: str = ResidualSides.layer_pattern
) -> tuple[jax.Array, tuple[int, ...], np.ndarray, np.ndarray]:
    """One basis per block: pool only the directions of block ``l``, with the global ``k``.

    .. math:: C_l = \\sum_{n \\in \\text{block } l} w_n v_n v_n^T,\\qquad U_l = \\operatorname{top}_k \\operatorname{eig}(C_l).

    Args:
      directions: from :func:`residual_directions`; those with ``layer=None`` (embedding, unembedding)
        take part only in the global ``C``.
      k: number of directions per block.
      d: the residual width.
      layer_pattern: the layer regex, named in the error message.

    Returns:
      ``(U_layers (L, d, k) float32, layer_ids, eigengaps (L,), explained_energies (L,))``.

    Raises:
      ValueError: no direction carries a layer index.

    Example:
      >>> import numpy as np
      >>> from jaxlab.transforms.grasp_identify import ModuleDirections, per_layer_subspaces
      >>> e, one = np.eye(3), np.ones(1)
      >>> dirs = [ModuleDirections("block_0/attn/o", 0, e[:, :1], one, one),
      ...         ModuleDirections("block_1/attn/o", 1, e[:, 2:], one, one)]
      >>> u_layers, ids, gaps, energies = per_layer_subspaces(dirs, 1, 3)
      >>> ids, np.abs(u_layers[:, :, 0]).tolist(), energies.tolist()
      ((0, 1), [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], [1.0, 1.0])
    """
    ids = sorted({x.layer for x in directions if x.layer is not None})
    if not ids:
        raise ValueError(
            "identify_spurious_subspace: aggregation='per_layer' but no module path carries a layer index "
            f"(pattern {layer_pattern!r}) and no LoRA leaf is stacked"
        )
    per, gaps, energies = [], [], []
    for lid in ids:
        sel = [x for x in directions if x.layer == lid]
        u_l, lam_l = pool_directions([x.vectors for x in sel], [x.weights for x in sel], d)
        per.append(top_k_basis(u_l, k, d))
        g, e = eigengap_and_energy(lam_l, k)
        gaps.append(g)
        energies.append(e)
    return jnp.asarray(np.stack(per), jnp.float32), tuple(ids), np.asarray(gaps), np.asarray(energies)


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
    min_update_norm: float = 1e-12,
    strict: bool | None = None,
) -> SpuriousSubspace:
    """Find the residual-stream directions shared by the updates of a naive LoRA fine-tune.

    .. math::
        C = \\sum_{\\text{modules } m} \\sum_i w_{m,i}\\, v_{m,i} v_{m,i}^T, \\quad
        w_{m,i} = \\sigma_{m,i}^2 / \\textstyle\\sum_j \\sigma_{m,j}^2, \\quad U = \\operatorname{top}_k \\operatorname{eig}(C),

    with ``v_{m,i}`` the residual-side singular vectors of ``dW_m = s A_m B_m`` (input side for readers,
    output side for writers; see :func:`lora_svd`). The steps: :func:`collect_lora_modules` (sides),
    :func:`common_residual_width` (``d_model``), :func:`residual_directions` (``v``, ``w``),
    :func:`pool_directions` (spectrum of ``C``), :func:`choose_k`, :func:`top_k_basis`,
    :func:`eigengap_and_energy` and, per block, :func:`per_layer_subspaces`.

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
      min_update_norm: no fine-tune signal when the total update norm ``sqrt(sum_m ||s A_m B_m||_F^2)``
        is at or below this (all updates zero, e.g. right after ``inject``, or float noise): the result is
        then untrustworthy with ``eigengap = nan``, ``explained_energy = 0.0`` and, for ``k=None``,
        ``k = 0`` (``U (d_model, 0)``: GRASP with it is the identity).
      strict: ``True``: raise when a user-given side rule matches no module path of ``lora_params`` (a typo;
        see :meth:`~jaxlab.transforms.residual_sides.ResidualSides.check`); off by default (``None``/``False``).

    Returns:
      A :class:`SpuriousSubspace` with ``U``, the spectrum, ``k``, eigengap and explained energy;
      ``result.trustworthy`` and ``result.reason`` judge it.

    Raises:
      ValueError: no LoRA pair on a declared side, mismatched factor shapes (naming the leaf), residual
        widths that differ between modules, a user rule that matches no module (``strict``), or bad
        arguments.

    Example:
      Three writers (``attn/o``) whose rank-2 updates share the planted direction ``e_0`` of an
      8-wide residual stream (singular value 3), each next to its own unit task direction ``e_{i+1}``:

      >>> import numpy as np
      >>> from jaxlab.transforms.grasp_identify import identify_spurious_subspace
      >>> e = np.eye(8)
      >>> params = {f"block_{i}": {"attn": {"o": {"lora_a": np.eye(4)[:, :2],
      ...                                         "lora_b": np.stack([3 * e[0], e[i + 1]])}}}
      ...           for i in range(3)}
      >>> res = identify_spurious_subspace(params)
      >>> res.U.shape, res.k, abs(float(res.U[0, 0])), res.trustworthy
      ((8, 1), 1, 1.0, True)
      >>> res.eigenvalues.round(6).tolist()   # 3 modules x 9/10 along e_0; 1/10 per task direction
      [2.7, 0.1, 0.1, 0.1, 0.0, 0.0]
      >>> round(res.eigengap, 6), round(res.explained_energy, 6)
      (27.0, 0.9)

      Right after ``inject`` (``lora_b = 0``) there is nothing to identify:

      >>> fresh = {"attn": {"o": {"lora_a": np.ones((4, 2)), "lora_b": np.zeros((2, 8))}}}
      >>> zero = identify_spurious_subspace(fresh)
      >>> zero.k, zero.trustworthy, zero.reason
      (0, False, 'all LoRA updates are zero (no fine-tune signal; lora_b = 0 as right after inject?)')
    """
    if aggregation not in ("global", "per_layer"):
        raise ValueError(f"identify_spurious_subspace: aggregation={aggregation!r}; expected 'global' or 'per_layer'")
    if k is not None and k < 0:
        raise ValueError(f"identify_spurious_subspace: k={k} must be >= 0")
    rules = as_residual_sides(sides)
    if strict:
        rules.check(lora_params, who="identify_spurious_subspace")

    # 1. the adapted modules that read / write the residual stream, and its width
    modules = collect_lora_modules(lora_params, rules)
    d_model = common_residual_width(modules)

    # 2. per module (and layer slice): residual-side singular vectors and their weights
    per_module = {
        m.path: residual_directions(m, scale=scale, weighting=weighting, top_per_module=top_per_module)
        for m in modules
    }
    directions = [x for dirs in per_module.values() for x in dirs]
    # the total update energy, before the per-module normalisation of the weights hides its size
    update_norm = float(np.sqrt(sum(float(np.sum(x.sigma**2)) for x in directions)))
    no_signal = not update_norm > min_update_norm

    # 3. pool them: the spectrum of C = sum w v v^T
    eigvecs, lam = pool_directions([x.vectors for x in directions], [x.weights for x in directions], d_model)

    # 4. the subspace and its diagnostics
    kk = 0 if no_signal and k is None else choose_k(lam, k, max_k)
    if kk > d_model:
        raise ValueError(f"identify_spurious_subspace: k={kk} exceeds d_model={d_model}")
    gap, energy = eigengap_and_energy(lam, kk)
    u_layers = layer_ids = layer_gaps = layer_energy = None
    if aggregation == "per_layer":
        u_layers, layer_ids, layer_gaps, layer_energy = per_layer_subspaces(
            directions, kk, d_model, rules.layer_pattern
        )
    if no_signal:  # whatever C's spectrum shows is float noise blown up to unit energy per module
        gap, energy = float("nan"), 0.0
        if layer_gaps is not None:
            layer_gaps, layer_energy = np.full_like(layer_gaps, np.nan), np.zeros_like(layer_energy)

    return SpuriousSubspace(
        U=jnp.asarray(top_k_basis(eigvecs, kk, d_model), jnp.float32),
        eigenvalues=lam,
        k=kk,
        eigengap=gap,
        explained_energy=energy,
        aggregation=aggregation,
        layer_ids=layer_ids,
        U_layers=u_layers,
        layer_eigengaps=layer_gaps,
        layer_explained_energy=layer_energy,
        module_singular_values={path: _module_sigma(dirs) for path, dirs in per_module.items()},
        min_eigengap=min_eigengap,
        update_norm=update_norm,
        min_update_norm=min_update_norm,
    )
