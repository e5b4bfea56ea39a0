"""GRASP on the residual stream: project the *gradient flowing back through* the residual, not the updates.

Update-mode GRASP (:func:`jaxlab.grasp`) constrains each adapted matrix on its residual axis, so the
adapters themselves never read or write ``span(U)``. It cannot see a second route: an adapter early in
the network re-routes the context so that *frozen* modules downstream write the spurious direction. The
residual mode closes that route at the level of the loss signal. With an orthonormal ``U (d_model, k)``
and ``P = I - beta U U^T``, at every residual write ``h`` (after the embedding and after each attention and
MLP addition) the forward pass is untouched and the cotangent is projected:

.. math::
    h \\mapsto h \\ (\\text{forward}), \\qquad
    \\bar h \\mapsto P \\bar h = \\bar h - \\beta\\, U (U^T \\bar h) \\ (\\text{backward}).

Every parameter upstream of ``h`` (adapted or not) then receives ``(\\partial h / \\partial \\theta)^T P \\bar h``:
the loss no longer asks anything to move the residual along ``span(U)``. Forward values, and therefore
whatever the pretrained model already does along ``U``, are exactly those of the plain model.

At ``beta = 1`` projecting the cotangent of every residual *write* (each module's output before it is
added) gives the same parameter gradients as projecting the residual itself after each addition, because
``P`` is idempotent and every parameter's gradient reaches it through some module output; this is what
lets :func:`jaxlab.nn.grasp_intercept` apply the mode to any Flax Linen model without editing it.

Reference: Gilligan-Lee et al., "Unsupervised Identification and Removal of Spurious Correlations During
Fine-Tuning", arXiv 2605.27676 (GRASP: "gradient projection ... prevents the model from acquiring new
reliance on the identified factor while preserving any pretrained content along it"). The residual
reading is ours (the paper's text is not available); ``experiments/grasp_persona`` measures both modes.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jaxlab.transforms.grasp import GRASP_MODES, _as_basis, check_grasp_beta, project_residual

__all__ = ["GRASP_MODES", "project_cotangent", "residual_basis"]

def residual_basis(subspace) -> jax.Array:
    """The orthonormal basis GRASP's residual mode uses: ``(d_model, k)`` or per-layer ``(L, d_model, k)``.

    Accepts what :func:`jaxlab.grasp` accepts (a :class:`~jaxlab.transforms.SpuriousSubspace`, an array
    ``(d_model, k)`` or ``(L, d_model, k)``, or ``{layer: (d_model, k)}`` with layers ``0..L-1``); the
    columns are orthonormalised (QR) once, in float32.
    """
    b = _as_basis(subspace)
    if b.U is not None:
        return b.U
    if b.layer_ids is not None and tuple(b.layer_ids) != tuple(range(len(b.layer_ids))):
        raise ValueError(
            f"GRASP residual mode: per-layer bases must cover layers 0..L-1 in order; got layers {list(b.layer_ids)}"
        )
    return b.U_layers


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _project_cotangent(h, U, beta):
    return h


def _fwd(h, U, beta):
    return h, U


def _bwd(beta, U, g):
    return project_residual(g, U, axis=-1, beta=beta), jnp.zeros_like(U)


_project_cotangent.defvjp(_fwd, _bwd)


def project_cotangent(h: jax.Array, subspace, beta: float = 1.0, *, orthonormal: bool = False) -> jax.Array:
    """Identity forward; on the way back ``g <- g - beta U (U^T g)`` on the last axis (the residual width).

    .. math:: \\operatorname{fwd}(h) = h, \\qquad \\operatorname{bwd}(\\bar h) = \\bar h - \\beta\\, U (U^T \\bar h).

    A ``jax.custom_vjp``: it composes with ``jit``, ``vmap``, ``lax.scan``, ``pmap``/``shard_map`` and
    sharded ``jit`` (the backward is a ``(d, k)`` matmul on the last axis, local to each shard of the
    other axes). Forward-mode AD (``jax.jvp``) is not defined for it, as for any ``custom_vjp``.

    Args:
      h: activations ``(..., d_model)``; returned unchanged (bit-identical).
      subspace: anything :func:`jaxlab.grasp` accepts with one global basis (an array ``(d_model, k)``,
        orthonormalised here by QR at trace time, or a :class:`~jaxlab.transforms.SpuriousSubspace`), or a
        *traced* ``(d_model, k)`` array, which is used as is and must already be orthonormal (e.g.
        ``U_layers[layer]`` indexed by a scanned layer counter).
      beta: projection strength in ``[0, 1]`` (a Python number).
      orthonormal: ``True`` uses a ``(d_model, k)`` array as given (no QR; the caller guarantees
        orthonormal columns, e.g. a basis from :func:`residual_basis`).

    Returns:
      ``h`` itself, with the projecting backward rule attached.

    Raises:
      ValueError: ``h``'s last axis is not ``d_model``, or a bad ``beta``/basis.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxlab.transforms import project_cotangent
      >>> U = jnp.eye(3)[:, :1]                                    # span(U) = e_0
      >>> f = lambda h: jnp.sum(project_cotangent(h, U) * jnp.array([1.0, 2.0, 3.0]))
      >>> h = jnp.ones(3)
      >>> float(f(h)), jax.grad(f)(h).tolist()                     # value unchanged, gradient loses e_0
      (6.0, [0.0, 2.0, 3.0])
    """
    beta = check_grasp_beta(beta)
    if isinstance(subspace, jax.core.Tracer) or (orthonormal and getattr(subspace, "ndim", 0) == 2):
        U = subspace  # a traced basis (e.g. U_layers[layer] under scan) is trusted to be orthonormal
    else:
        U = residual_basis(subspace)
        if U.ndim != 2:
            raise ValueError(
                f"project_cotangent: a per-layer basis {tuple(U.shape)} needs a layer; index it first "
                "(U_layers[layer]) or use jaxlab.nn.residual_projection_hook"
            )
    if h.shape[-1] != U.shape[0]:
        raise ValueError(
            f"project_cotangent: h has shape {tuple(h.shape)}; its last axis must be d_model={U.shape[0]} "
            f"(the subspace has shape {tuple(U.shape)})"
        )
    if U.shape[-1] == 0 or beta == 0.0:
        return h
    return _project_cotangent(h, U, beta)
