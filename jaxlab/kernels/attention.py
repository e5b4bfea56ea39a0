"""JVP-capable fused attention: a Pallas flash forward and a fused Pallas primal-and-tangent sweep.

Layout ``(batch, heads, seq, head_dim)`` -- what :func:`jaxlab.nn.dit.dot_product_attention` uses
(``jaxlab.nn.transformer.CausalSelfAttention`` transposes its ``(b, t, h, d)`` to it). With
``S = c\\,Q K^\\top`` (``c`` = ``sm_scale``, default ``1/sqrt(head_dim)``), key padding and an
optional causal mask ``M``,

.. math::

    P = \\operatorname{softmax}(S + M), \\qquad O = P V .

For tangents ``(\\dot Q, \\dot K, \\dot V)``, ``\\dot S = c(\\dot Q K^\\top + Q \\dot K^\\top)`` and

.. math::

    \\dot O_i = \\sum_j P_{ij}\\big(\\dot V_j + (\\dot S_{ij} - \\mu_i) V_j\\big),
    \\qquad \\mu_i = \\sum_j P_{ij} \\dot S_{ij} .

**Kernels** (``pl.pallas_call``, grid ``(batch*heads, query blocks)``, the K/V sequence of one
(batch, head) as one block and a ``fori_loop`` over ``block_k`` slices of it):

* forward: online softmax -- running max ``m``, normaliser ``l``, accumulator ``acc_o`` rescaled by
  ``exp(m_old - m_new)`` at every K/V block; ``O = acc_o / l``.
* tangent: the same sweep keeps ``m, l, acc_o`` plus ``acc_do = sum_j p_ij (dV_j + dS_ij V_j)`` and
  ``acc_mu = sum_j p_ij dS_ij``, all rescaled by the same factor; at the end
  ``dO = acc_do / l - (acc_mu / l) * (acc_o / l)``. The ``(seq, seq)`` tangent of the attention
  matrix is never materialised. Matmuls take the input dtype with float32 accumulation; the
  softmax statistics are float32 (``p`` is cast to the value dtype for ``p @ V``, as flash
  attention does).

Ragged lengths: sequences are zero-padded to whole blocks, padded keys get probability exactly 0,
padded query rows are sliced off. ``causal=True`` masks ``j > i`` (queries and keys aligned at 0).

**How AD is wired** (JAX's own Pallas flash kernels are ``custom_vjp`` only, so ``jax.jvp`` cannot
pass them):

* :func:`flash_attention` is a ``jax.custom_jvp``. Its primal is a ``jax.custom_vjp`` function
  (forward = the flash kernel; backward = **a jnp recomputation**: the VJP of
  :func:`attention_reference`, which materialises ``P`` per (batch, head) -- there is no Pallas
  backward kernel yet).
* Its JVP rule returns ``O`` from that ``custom_vjp`` primal and ``dO`` from a small JAX primitive
  ``flash_attention_tangent`` (impl/lowering = the fused tangent kernel above, which recomputes
  ``O`` internally). The primitive is linear in ``(dQ, dK, dV)`` and carries its own rules:
  transpose = the VJP of :func:`attention_reference` (so plain ``jax.grad``, which JAX runs as
  linearise-the-JVP-rule-then-transpose, works), JVP = the primitive again for tangent inputs plus a
  jnp second-order term for the primal inputs (so ``jax.grad`` of a function that calls ``jax.jvp``
  -- the MeanFlow loss -- works), batching = fold the mapped axis into ``batch`` (so ``jax.vmap`` of
  a ``jax.jvp`` -- MeanFlow's two-tangent "auto" mode -- works).
  Consequence: ``jax.jvp`` runs two kernels (flash forward + fused tangent sweep), not one.
  A single launch returning both would need ``O`` to be computable from the primal inputs alone
  under JAX's linearisation, which a kernel that also consumes the tangents cannot give.

**What is verified** (``tests/test_kernels_attention.py``, interpret mode on CPU): primal, ``jax.jvp``
tangent, ``jax.grad`` and the gradient of a MeanFlow-style loss ``||u - sg(target from jax.jvp)||^2``
against :func:`attention_reference`, ragged lengths (7, 13, 33) with blocks 8/16, causal and not,
float32 and bfloat16; ``jax.vmap`` of ``jax.jvp``. Lowering from CPU with ``jax.export``
(:data:`LOWERING_STATUS`): Mosaic TPU for both kernels; for CUDA through Pallas' **Triton** backend
(``pltriton.CompilerParams``; deprecated in recent JAX -- the spec's preferred Mosaic GPU backend does
not lower this kernel as written: it needs explicit ``plgpu`` layouts and ``wgmma`` matmuls, not done).
On TPU the causal loop runs the static number of K/V blocks (Mosaic TPU did not lower the dynamic
trip count), so causal blocks above the diagonal are computed and masked there. **Not verified:** any run on a GPU or TPU, and any timing (no speed claim;
``benchmarks/meanflow_step.py`` has the fused-attention row for a GPU run).

Reference: Dao et al., "FlashAttention" (NeurIPS 2022; online softmax); Rabe & Staats,
"Self-attention does not need O(n^2) memory" (arXiv 2112.05682).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

__all__ = ["LOWERING_STATUS", "attention_reference", "flash_attention"]

#: What ``jax.export(jax.jit(f), platforms=[...])`` from CPU lowered, for the forward and ``jax.jvp``
#: (both kernels), causal and not, bf16 ``(2, 4, 256, 64)`` (``tests/test_kernels_attention.py``).
LOWERING_STATUS = {
    "tpu": "Mosaic TPU: tpu_custom_call (static K/V trip count; causal blocks above the diagonal are "
           "computed and masked)",
    "cuda": "Pallas Triton backend: __gpu$xla.gpu.triton custom call (Triton IR); Mosaic GPU not "
            "lowered (iota/layout inference fails; would need plgpu layouts and wgmma)",
}

_NEG = -1e30  # finite mask value: exp(_NEG - m) == 0 for any reachable m, and no inf - inf
_SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_IMPLEMENTATIONS = (None, "xla", "pallas")


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------


def attention_reference(q, k, v, *, causal: bool = False, sm_scale: float | None = None):
    """Plain-jnp attention ``softmax(sm_scale * q k^T [+ causal mask]) v`` on ``(B, H, S, D)``.

    Computed in float32 (``Precision.HIGHEST``) and cast to ``q.dtype``; differentiable in every mode.

    Args:
      q: queries ``(B, H, Sq, D)``.
      k: keys ``(B, H, Sk, D)``.
      v: values ``(B, H, Sk, D)``.
      causal: mask keys ``j > i``.
      sm_scale: logit scale; ``None`` = ``1/sqrt(D)``.

    Returns:
      ``(B, H, Sq, D)`` in ``q.dtype``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxlab.kernels import attention_reference
      >>> q = jnp.zeros((1, 1, 3, 4)); v = jnp.arange(12.0).reshape(1, 1, 3, 4)
      >>> attention_reference(q, q, v, causal=True)[0, 0, :, 0]   # uniform over the visible keys
      Array([0., 2., 4.], dtype=float32)
    """
    _check_qkv(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    hi = lax.Precision.HIGHEST
    qf, kf, vf = (a.astype(jnp.float32) for a in (q, k, v))
    s = scale * jnp.einsum("bhqd,bhkd->bhqk", qf, kf, precision=hi)
    if causal:
        sq, sk = q.shape[2], k.shape[2]
        keep = jnp.arange(sk)[None, :] <= jnp.arange(sq)[:, None]
        s = jnp.where(keep, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhqk,bhkd->bhqd", p, vf, precision=hi).astype(q.dtype)


def _check_qkv(q, k, v):
    for name, a in (("q", q), ("k", k), ("v", v)):
        if not hasattr(a, "ndim") or a.ndim != 4:
            raise ValueError(
                f"attention: {name} must be (batch, heads, seq, head_dim), got shape "
                f"{getattr(a, 'shape', a)!r}"
            )
        if jnp.dtype(a.dtype) not in _SUPPORTED_DTYPES:
            raise TypeError(f"attention: {name} must be float32 or bfloat16, got {a.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k {k.shape} and v {v.shape} must have the same shape")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"attention: q {q.shape} and k {k.shape} must agree in (batch, heads, ., head_dim)"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


# --------------------------------------------------------------------------------------------------
# Pallas kernels
# --------------------------------------------------------------------------------------------------


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


def _dot_nt(a, b):
    """``a @ b.T`` with float32 accumulation (no explicit transpose)."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _kv_steps(qi, *, bq, bk, n_kv, causal, skip):
    """Number of K/V blocks query block ``qi`` visits (causal + ``skip``: stop after the diagonal;
    Mosaic TPU lowers only the static trip count, so there the masked blocks are computed)."""
    if not causal or not skip:
        return n_kv
    return jnp.minimum(n_kv, ((qi + 1) * bq + bk - 1) // bk)


def _mask(qi, j, *, bq, bk, kv_len, causal):
    row = qi * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    col = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    keep = col < kv_len
    if causal:
        keep = jnp.logical_and(keep, col <= row)
    return keep


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, *, scale, bq, bk, n_kv, kv_len, causal, skip):
    qi = pl.program_id(1)
    q = q_ref[...]
    d = v_ref.shape[-1]

    def body(j, carry):
        m, l, acc = carry
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        keep = _mask(qi, j, bq=bq, bk=bk, kv_len=kv_len, causal=causal)
        s = jnp.where(keep, scale * _dot_nt(q, k), _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(keep, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m - m_new)
        l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
        acc = alpha * acc + _dot(p.astype(v.dtype), v)
        return m_new, l, acc

    init = (jnp.full((bq, 1), _NEG, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
            jnp.zeros((bq, d), jnp.float32))
    steps = _kv_steps(qi, bq=bq, bk=bk, n_kv=n_kv, causal=causal, skip=skip)
    _, l, acc = lax.fori_loop(0, steps, body, init)
    o_ref[...] = (acc / l).astype(o_ref.dtype)


def _tangent_kernel(q_ref, k_ref, v_ref, tq_ref, tk_ref, tv_ref, do_ref, *, scale, bq, bk, n_kv,
                    kv_len, causal, skip):
    qi = pl.program_id(1)
    q, tq = q_ref[...], tq_ref[...]
    d = v_ref.shape[-1]

    def body(j, carry):
        m, l, mu, acc_o, acc_do = carry
        sl = pl.ds(j * bk, bk)
        k, v, tk, tv = k_ref[sl, :], v_ref[sl, :], tk_ref[sl, :], tv_ref[sl, :]
        keep = _mask(qi, j, bq=bq, bk=bk, kv_len=kv_len, causal=causal)
        s = jnp.where(keep, scale * _dot_nt(q, k), _NEG)
        ds = scale * (_dot_nt(tq, k) + _dot_nt(q, tk))
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(keep, jnp.exp(s - m_new), 0.0)
        pds = jnp.where(keep, p * ds, 0.0)
        alpha = jnp.exp(m - m_new)
        l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
        mu = alpha * mu + jnp.sum(pds, axis=1, keepdims=True)
        pv = p.astype(v.dtype)
        acc_o = alpha * acc_o + _dot(pv, v)
        acc_do = alpha * acc_do + _dot(pv, tv) + _dot(pds.astype(v.dtype), v)
        return m_new, l, mu, acc_o, acc_do

    col = lambda: jnp.zeros((bq, 1), jnp.float32)  # noqa: E731
    init = (jnp.full((bq, 1), _NEG, jnp.float32), col(), col(),
            jnp.zeros((bq, d), jnp.float32), jnp.zeros((bq, d), jnp.float32))
    steps = _kv_steps(qi, bq=bq, bk=bk, n_kv=n_kv, causal=causal, skip=skip)
    _, l, mu, acc_o, acc_do = lax.fori_loop(0, steps, body, init)
    inv = 1.0 / l
    do_ref[...] = (acc_do * inv - (mu * inv) * (acc_o * inv)).astype(do_ref.dtype)


def _plan(q, k, block_q, block_k):
    sq, sk = q.shape[2], k.shape[2]
    bq = min(block_q, _round_up(sq, 8))
    bk = min(block_k, _round_up(sk, 8))
    return bq, bk, _round_up(sq, bq), _round_up(sk, bk)


def _pad_seq(x, length):
    b, h, s, d = x.shape
    x = x.reshape(b * h, s, d)
    return jnp.pad(x, ((0, 0), (0, length - s), (0, 0))) if length != s else x


def _compiler_params(backend):
    if backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
    if backend == "gpu":  # Pallas' Triton backend (see the module docstring on Mosaic GPU)
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=4, num_stages=2)
    return None


def _call(kernel, name, q, kvs, qs, *, causal, scale, block_q, block_k, interpret, backend):
    """Shared pallas_call: ``qs`` are query-shaped inputs (tiled), ``kvs`` key-shaped (whole)."""
    ref = qs[0]
    b, h, sq, d = ref.shape
    sk = kvs[0].shape[2]
    bq, bk, sq_pad, sk_pad = _plan(ref, kvs[0], block_q, block_k)
    q_spec = pl.BlockSpec((None, bq, d), lambda bh, i: (bh, i, 0))
    kv_spec = pl.BlockSpec((None, sk_pad, d), lambda bh, i: (bh, 0, 0))
    kern = functools.partial(kernel, scale=scale, bq=bq, bk=bk, n_kv=sk_pad // bk, kv_len=sk,
                             causal=causal, skip=interpret or backend != "tpu")
    args = [_pad_seq(x, sq_pad) for x in qs[:1]] + [_pad_seq(x, sk_pad) for x in kvs[:2]]
    args += [_pad_seq(x, sq_pad) for x in qs[1:]] + [_pad_seq(x, sk_pad) for x in kvs[2:]]
    specs = [q_spec, kv_spec, kv_spec] + [q_spec] * (len(qs) - 1) + [kv_spec] * (len(kvs) - 2)
    out = pl.pallas_call(
        kern,
        out_shape=jax.ShapeDtypeStruct((b * h, sq_pad, d), ref.dtype),
        grid=(b * h, sq_pad // bq),
        in_specs=specs,
        out_specs=q_spec,
        interpret=interpret,
        compiler_params=None if interpret else _compiler_params(backend),
        name=name,
    )(*args)
    return out[:, :sq].reshape(b, h, sq, d)


def _flash_forward(q, k, v, *, causal, scale, block_q, block_k, interpret, backend):
    return _call(_fwd_kernel, "flash_attention_fwd", q, [k, v], [q], causal=causal, scale=scale,
                 block_q=block_q, block_k=block_k, interpret=interpret, backend=backend)


def _fused_tangent(q, k, v, tq, tk, tv, *, causal, scale, block_q, block_k, interpret, backend):
    return _call(_tangent_kernel, "flash_attention_jvp", q, [k, v, tk, tv], [q, tq], causal=causal,
                 scale=scale, block_q=block_q, block_k=block_k, interpret=interpret, backend=backend)


# --------------------------------------------------------------------------------------------------
# The tangent primitive: linear in (tq, tk, tv), with transpose / JVP / batching rules
# --------------------------------------------------------------------------------------------------

_tangent_p = Primitive("flash_attention_tangent")


def _ref_fn(params):
    return functools.partial(attention_reference, causal=params["causal"], sm_scale=params["scale"])


def _tangent_impl(q, k, v, tq, tk, tv, **params):
    return _fused_tangent(q, k, v, tq, tk, tv, **params)


_tangent_p.def_impl(_tangent_impl)
_tangent_p.def_abstract_eval(lambda q, *_, **__: jax.core.ShapedArray(q.shape, q.dtype))
mlir.register_lowering(_tangent_p, mlir.lower_fun(_tangent_impl, multiple_results=False))


def _tangent_transpose(ct, q, k, v, tq, tk, tv, **params):
    """The map ``(tq, tk, tv) -> dO`` is the JVP of attention; its transpose is attention's VJP."""
    if any(ad.is_undefined_primal(x) for x in (q, k, v)):
        raise ValueError("flash_attention_tangent is linear only in its tangent inputs")
    if type(ct) is ad.Zero:
        return [None] * 3 + [None if not ad.is_undefined_primal(t) else ad.Zero(t.aval)
                             for t in (tq, tk, tv)]
    _, vjp = jax.vjp(_ref_fn(params), q, k, v)
    cts = vjp(ct.astype(q.dtype))
    return [None] * 3 + [c.astype(t.aval.dtype) if ad.is_undefined_primal(t) else None
                         for c, t in zip(cts, (tq, tk, tv))]


def _tangent_jvp(primals, tangents, **params):
    q, k, v, tq, tk, tv = primals
    out = _tangent_p.bind(*primals, **params)
    d_prim, d_tan = tangents[:3], tangents[3:]
    terms = []
    if any(type(t) is not ad.Zero for t in d_tan):  # linear part: the same fused kernel
        terms.append(_tangent_p.bind(q, k, v, *map(ad.instantiate_zeros, d_tan), **params))
    if any(type(t) is not ad.Zero for t in d_prim):  # second-order part, in jnp
        ref = _ref_fn(params)
        first = lambda a, b, c: jax.jvp(ref, (a, b, c), (tq, tk, tv))[1]  # noqa: E731
        terms.append(jax.jvp(first, (q, k, v), tuple(map(ad.instantiate_zeros, d_prim)))[1])
    return out, functools.reduce(jnp.add, terms)


def _tangent_batch(args, dims, **params):
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    flat = []
    for a, d in zip(args, dims):
        a = batching.bdim_at_front(a, d, size)  # (n, B, H, S, D); broadcasts unmapped args
        flat.append(a.reshape((size * a.shape[1],) + a.shape[2:]))
    out = _tangent_p.bind(*flat, **params)
    return out.reshape((size, -1) + out.shape[1:]), 0


ad.primitive_jvps[_tangent_p] = _tangent_jvp
ad.primitive_transposes[_tangent_p] = _tangent_transpose
batching.primitive_batchers[_tangent_p] = _tangent_batch


# --------------------------------------------------------------------------------------------------
# custom_jvp (outside) over custom_vjp (primal)
# --------------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash_primal(q, k, v, static):
    return _flash_forward(q, k, v, **dict(static))


def _flash_primal_fwd(q, k, v, static):
    return _flash_forward(q, k, v, **dict(static)), (q, k, v)


def _flash_primal_bwd(static, res, ct):
    q, k, v = res
    _, vjp = jax.vjp(_ref_fn(dict(static)), q, k, v)  # jnp recomputation (no Pallas backward yet)
    return vjp(ct.astype(q.dtype))


_flash_primal.defvjp(_flash_primal_fwd, _flash_primal_bwd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _flash(q, k, v, static):
    return _flash_primal(q, k, v, static)


@_flash.defjvp
def _flash_jvp(static, primals, tangents):
    q, k, v = primals
    out = _flash_primal(q, k, v, static)
    d_out = _tangent_p.bind(q, k, v, *(t.astype(q.dtype) for t in tangents), **dict(static))
    return out, d_out


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def _canonical_backend(backend=None):
    backend = (jax.default_backend() if backend is None else backend).lower()
    return "gpu" if backend in ("cuda", "rocm", "gpu") else backend


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    sm_scale: float | None = None,
    block_q: int = 128,
    block_k: int = 128,
    interpret: bool | None = None,
    implementation: str | None = None,
    backend: str | None = None,
) -> jax.Array:
    """Attention ``softmax(sm_scale * q k^T [+ causal mask]) v`` that supports ``jax.jvp``,
    ``jax.grad``, ``jax.grad`` of ``jax.jvp`` and ``jax.vmap``, by Pallas kernels or XLA.

    .. math::

        O = \\operatorname{softmax}(c\\,QK^\\top + M)\\,V,\\qquad
        \\dot O_i = \\sum_j P_{ij}\\big(\\dot V_j + (\\dot S_{ij} - \\mu_i) V_j\\big)

    (see the module docstring for the kernels and how AD is wired).

    Args:
      q: ``(batch, heads, seq_q, head_dim)``, float32 or bfloat16.
      k: ``(batch, heads, seq_k, head_dim)``, same dtype.
      v: ``(batch, heads, seq_k, head_dim)``, same dtype.
      causal: mask keys ``j > i``.
      sm_scale: logit scale; ``None`` = ``1/sqrt(head_dim)``.
      block_q: query rows per grid step (clipped to the padded length; multiple of 8).
      block_k: keys per inner-loop step (clipped likewise; multiple of 8).
      interpret: run the kernels in Pallas interpret mode; ``None``: only on CPU.
      implementation: ``"pallas"`` (the kernels), ``"xla"`` (:func:`attention_reference`, plain jnp)
        or ``None`` (auto: ``"xla"`` everywhere until the kernels have run on a device).
      backend: compiler params to use (``"tpu"``, ``"gpu"``, ``"cpu"``); ``None``: the default backend.

    Returns:
      ``(batch, heads, seq_q, head_dim)`` in the input dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxlab.kernels import attention_reference, flash_attention
      >>> q, k, v = jax.random.normal(jax.random.PRNGKey(0), (3, 1, 2, 13, 8))
      >>> t = (jnp.ones_like(q), jnp.zeros_like(k), jnp.ones_like(v))
      >>> f = lambda *a: flash_attention(*a, causal=True, block_q=8, block_k=8, implementation="pallas")
      >>> o, do = jax.jit(lambda p, t: jax.jvp(f, p, t))((q, k, v), t)   # interpret mode on CPU
      >>> ro, rdo = jax.jvp(lambda *a: attention_reference(*a, causal=True), (q, k, v), t)
      >>> bool(jnp.allclose(o, ro, atol=1e-5)), bool(jnp.allclose(do, rdo, atol=1e-4))
      (True, True)
    """
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"implementation must be None, 'xla' or 'pallas', got {implementation!r}")
    _check_qkv(q, k, v)
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(b, int) or isinstance(b, bool) or b <= 0 or b % 8:
            raise ValueError(f"{name} must be a positive multiple of 8, got {b!r}")
    if implementation in (None, "xla"):
        return attention_reference(q, k, v, causal=causal, sm_scale=sm_scale)
    backend = _canonical_backend(backend)
    if interpret is None:
        interpret = backend == "cpu"
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    static = (("causal", bool(causal)), ("scale", scale), ("block_q", block_q),
              ("block_k", block_k), ("interpret", bool(interpret)), ("backend", backend))
    return _flash(q, k, v, static)
