"""GRASP's residual mode in Flax Linen models: a ``resid_hook`` for the bundled models, an interceptor for any.

Both install :func:`jaxlab.project_cotangent` -- identity forward, ``g <- g - beta U (U^T g)`` backward --
at the residual stream's writes:

* :func:`residual_projection_hook` returns a ``resid_hook(layer, site, h)`` for
  :class:`~jaxlab.nn.Transformer` and :class:`~jaxlab.nn.Decoder`, which call it after the embedding
  (``site="embed"``) and after every attention and MLP residual addition (exact residual points; works
  under the Decoder's ``nn.scan`` with a traced layer index, and with per-layer bases);
* :func:`grasp_intercept` is a context manager (``flax.linen.intercept_methods``) that projects the
  cotangent of the *output* of every module whose path matches a ``"writer"`` rule of the GRASP residual
  sides (the same rules update-mode GRASP uses: attention out, MLP down, embedding), so a model you did not
  write gets the residual mode without editing it. At ``beta = 1`` this gives the same parameter
  gradients as projecting at the residual points (``P`` is idempotent; see
  :mod:`jaxlab.transforms.grasp_residual`) provided the writer's output is what is added to the residual:
  with a norm after the writer (Gemma-2 "sandwich" norms) declare that norm module as the writer.

Example (both routes give the same gradients on the bundled Transformer):

  >>> import jax, jax.numpy as jnp, numpy as np
  >>> from jaxlab.nn import Transformer, TransformerConfig, causal_lm_loss
  >>> from jaxlab.nn import grasp_intercept, residual_projection_hook
  >>> cfg = TransformerConfig(vocab=16, d_model=8, n_layers=2, n_heads=2, d_ff=16, max_len=8)
  >>> model, tokens = Transformer(cfg), jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 16
  >>> params = model.init(jax.random.PRNGKey(0), tokens)["params"]
  >>> U = np.linalg.qr(np.random.default_rng(0).normal(size=(8, 2)))[0]
  >>> def loss(p, **kw):
  ...     return causal_lm_loss(model.apply({"params": p}, tokens, **kw), tokens)
  >>> g_hook = jax.grad(lambda p: loss(p, resid_hook=residual_projection_hook(U)))(params)
  >>> with grasp_intercept(U):
  ...     g_icpt = jax.grad(loss)(params)
  >>> k = lambda g: g["block_0"]["mlp"]["down"]["kernel"].value
  >>> bool(jnp.allclose(k(g_hook), k(g_icpt), atol=1e-6)), float(jnp.abs(k(g_hook) @ U).max()) < 1e-6
  (True, True)
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlab.transforms.grasp import check_grasp_beta
from jaxlab.transforms.grasp_residual import project_cotangent, residual_basis
from jaxlab.transforms.residual_sides import WRITER, as_residual_sides

__all__ = ["RESID_SITES", "grasp_intercept", "residual_projection_hook"]

#: The residual-write sites the bundled models call ``resid_hook`` at.
RESID_SITES = ("embed", "attn", "mlp")

ResidHook = Callable[[int, str, jax.Array], jax.Array]


def _check_width(h, d: int, where: str) -> None:
    if h.shape[-1] != d:
        raise ValueError(
            f"GRASP residual mode: {where} has shape {tuple(h.shape)}; its last axis must be d_model={d} "
            "(the subspace's width)"
        )


def residual_projection_hook(
    subspace, beta: float = 1.0, *, sites: Iterable[str] = RESID_SITES, then: ResidHook | None = None
) -> ResidHook:
    """A ``resid_hook`` that projects the gradient flowing back through the residual stream off ``span(U)``.

    .. math:: h \\mapsto h, \\qquad \\bar h \\mapsto \\bar h - \\beta\\, U_l (U_l^T \\bar h)

    at each call ``(layer l, site, h)`` whose ``site`` is in ``sites``.

    Args:
      subspace: a global basis (``(d_model, k)`` array or :class:`~jaxlab.transforms.SpuriousSubspace`) or
        per-layer bases ``(L, d_model, k)`` / ``{0: ..., L-1: ...}``; block ``l``'s writes use entry ``l``
        and the embedding uses entry 0. Orthonormalised once here.
      beta: projection strength in ``[0, 1]``.
      sites: which writes to project (default all: ``"embed"``, ``"attn"``, ``"mlp"``).
      then: another hook to run first at every call (steering, ablation); its output is what gets the
        projected backward rule.

    Returns:
      ``hook(layer, site, h) -> h`` (``layer`` may be a traced int under ``nn.scan``).

    Raises:
      ValueError: unknown site, bad ``beta``/basis, or (when called) ``h``'s last axis is not ``d_model``.
    """
    sites = tuple(sites)
    bad = [s for s in sites if s not in RESID_SITES]
    if bad:
        raise ValueError(f"residual_projection_hook: unknown sites {bad}; expected a subset of {RESID_SITES}")
    beta = check_grasp_beta(beta)
    U = residual_basis(subspace)
    d = U.shape[-2]
    off = U.shape[-1] == 0 or beta == 0.0

    def hook(layer, site, h):
        if then is not None:
            h = then(layer, site, h)
        if off or site not in sites:
            return h
        _check_width(h, d, f"the residual at (layer {layer}, site {site!r})")
        Ul = U if U.ndim == 2 else jnp.take(U, layer, axis=0)
        return project_cotangent(h, Ul, beta, orthonormal=True)

    return hook


@contextlib.contextmanager
def grasp_intercept(subspace, sides=None, beta: float = 1.0, *, modules: str | None = None):
    """Within the ``with`` block, every Linen module that writes the residual gets GRASP's residual mode.

    Intercepts ``__call__`` of each module whose path (``"block_0/attn/o"``) matches a ``"writer"`` rule of
    ``sides`` (default rules: attention out, MLP down, embedding -- the same rules :func:`jaxlab.grasp`
    uses; override with ``{pattern: "writer"}``), or, with ``modules``, the given regex, and returns its
    output with :func:`jaxlab.project_cotangent` attached. Forward values are unchanged. Works for
    ``init``/``apply`` of any model, inside ``jit``/``vmap``/``nn.scan``.

    Args:
      subspace: one global basis ``(d_model, k)`` (or a :class:`~jaxlab.transforms.SpuriousSubspace`);
        per-layer bases need the layer index, which a module path under ``nn.scan`` does not carry: use
        :func:`residual_projection_hook` there.
      sides: residual-side rules as for :func:`jaxlab.grasp`; only ``"writer"`` rules are used.
      beta: projection strength in ``[0, 1]``.
      modules: a regex (``re.search`` on the module path) replacing the writer rules.

    Raises:
      ValueError: a per-layer basis, bad ``beta``, or (during apply) a matched module whose output is not
        an array with last axis ``d_model`` (the message names the module path and shape).
    """
    beta = check_grasp_beta(beta)
    U = residual_basis(subspace)
    if U.ndim != 2:
        raise ValueError(
            f"grasp_intercept: per-layer bases {tuple(U.shape)} are not supported (a module path under nn.scan "
            "has no layer index); pass a global (d_model, k) basis or use residual_projection_hook"
        )
    rules = as_residual_sides(sides)
    pattern = re.compile(modules) if modules is not None else None

    def is_writer(path: str) -> bool:
        if pattern is not None:
            return pattern.search(path) is not None
        return rules.side_of(path) == WRITER

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__" or U.shape[-1] == 0 or beta == 0.0:
            return out
        path = "/".join(str(p) for p in context.module.path)
        if not path or not is_writer(path):
            return out
        if not isinstance(out, jax.Array):
            raise ValueError(f"grasp_intercept: module {path!r} returned {type(out).__name__}, not an array")
        _check_width(out, U.shape[0], f"the output of module {path!r}")
        return project_cotangent(out, U, beta, orthonormal=True)

    with nn.intercept_methods(interceptor):
        yield

