"""Low-rank adaptation (LoRA) for Flax params: a Linen module and functional inject/merge on any tree.

A LoRA-adapted Dense kernel ``K (d_in, d_out)`` computes

.. math:: y = x (K + s\\, A B) + b,\\qquad A \\in \\mathbb{R}^{d_in \\times r},\\ B \\in \\mathbb{R}^{r \\times d_out},\\ B_0 = 0,

with ``s = alpha / r`` (LoRA) or ``s = alpha / sqrt(r)`` (rsLoRA); ``alpha`` defaults to ``r`` (``s = 1``).
``A`` starts as ``U(-1/sqrt(d_in), 1/sqrt(d_in))`` (the Kaiming-uniform init of the reference code).

Two ways to use it:

* :class:`LoRADense` inside a model you build;
* :func:`inject` into an existing param tree by path patterns, then run the *unchanged* base model on
  ``merge(params)`` inside the loss (gradients reach ``lora_a``/``lora_b`` through the merge). Freeze
  the base with :func:`freeze_base` (a ``multi_transform`` that zeroes non-LoRA updates).

The functional API takes plain or *boxed* params alike: the ``nn.Partitioned`` /
``nn.LogicallyPartitioned`` leaves that ``Transformer.init`` / ``Decoder.init`` return (logical axis names
for sharding). Boxes are kept, and the factors of a boxed kernel with names ``(..., in, out)`` get
``lora_a (..., in, None)`` and ``lora_b (..., None, out)``, so the adapted tree still shards by name.

References: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022 (eq. 3);
Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA" (rsLoRA), 2023.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from flax.core import unfreeze

from jaxlab.paths import leaf_name, slash_path

__all__ = [
    "LoRADense",
    "freeze_base",
    "inject",
    "lora_modules",
    "lora_scale",
    "merge",
    "trainable_mask",
]

_BASE_LEAVES = ("kernel", "embedding")


def lora_scale(rank: int, alpha: float | None = None, rslora: bool = False) -> float:
    """The LoRA scale: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA; ``alpha=None`` means ``alpha = r``.

    Example:
      >>> from jaxlab.nn.lora import lora_scale
      >>> lora_scale(8), lora_scale(8, alpha=16), lora_scale(4, alpha=8, rslora=True)
      (1.0, 2.0, 4.0)
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1; got {rank}")
    a = float(rank if alpha is None else alpha)
    return a / math.sqrt(rank) if rslora else a / rank


def _lora_a_init(key, shape, dtype=jnp.float32):
    fan_in = shape[-2]
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class LoRADense(nn.Module):
    """A Dense layer with a frozen kernel plus a trainable low-rank update ``s * lora_a @ lora_b``.

    .. math:: y = x\\,\\mathrm{sg}(K) + s\\,(x A) B + b

    Params: ``kernel (d_in, features)``, ``bias (features,)``, ``lora_a (d_in, rank)``,
    ``lora_b (rank, features)`` (zeros, so the layer equals its base at init). ``sg`` is
    ``stop_gradient`` when ``freeze_kernel`` (the optimizer must still skip the kernel for weight decay:
    use :func:`freeze_base`).

    Attributes:
      features: output width.
      rank: LoRA rank ``r``.
      alpha: LoRA alpha (``None``: ``alpha = rank``).
      rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
      use_bias: add a bias.
      freeze_kernel: stop gradients into ``kernel`` and ``bias``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxlab.nn import LoRADense
      >>> layer = LoRADense(8, rank=2)
      >>> x = jnp.ones((1, 4))
      >>> params = layer.init(jax.random.PRNGKey(0), x)["params"]
      >>> sorted(params), params["lora_a"].shape, params["lora_b"].shape
      (['bias', 'kernel', 'lora_a', 'lora_b'], (4, 2), (2, 8))
      >>> y = layer.apply({"params": params}, x)   # lora_b = 0: the base layer at init
      >>> bool(jnp.allclose(y, x @ params["kernel"] + params["bias"]))
      True
    """

    features: int
    rank: int
    alpha: float | None = None
    rslora: bool = False
    use_bias: bool = True
    freeze_kernel: bool = True
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d_in = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (d_in, self.features), self.param_dtype)
        a = self.param("lora_a", _lora_a_init, (d_in, self.rank), self.param_dtype)
        b = self.param("lora_b", nn.initializers.zeros_init(), (self.rank, self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        if self.freeze_kernel:
            kernel = jax.lax.stop_gradient(kernel)
            bias = None if bias is None else jax.lax.stop_gradient(bias)
        dtype = self.dtype or jnp.result_type(x, kernel)
        x, kernel, a, b = (t.astype(dtype) for t in (x, kernel, a, b))
        s = lora_scale(self.rank, self.alpha, self.rslora)
        y = x @ kernel + s * ((x @ a) @ b)
        if bias is not None:
            y = y + bias.astype(dtype)
        return y


def _flat(params):
    return traverse_util.flatten_dict(unfreeze(params), keep_empty_nodes=True)


def _value(x):
    """The array inside a Flax metadata box (``nn.Partitioned`` ...), or ``x`` itself."""
    return x.value if isinstance(x, nn.meta.AxisMetadata) else x


def _factor_box(base, value, names_of):
    """Box a new LoRA factor like its ``base`` leaf: ``value`` itself for a plain base; for a
    ``nn.Partitioned`` base (``LogicallyPartitioned`` included: its mesh and rules are kept) the same box
    type with logical names ``names_of(base names padded to base.ndim)``; a plain array for any other box.
    """
    if not isinstance(base, nn.Partitioned):
        return value
    ndim = base.value.ndim
    names = (tuple(base.names) + (None,) * ndim)[:ndim]
    return base.replace(value=value, names=names_of(names))


def lora_modules(params) -> list[str]:
    """Module paths (``"a/b/c"``) that carry ``lora_a``/``lora_b``."""
    return sorted({slash_path(k[:-1]) for k in _flat(params) if k[-1] == "lora_a"})


def inject(
    params,
    targets: str | Sequence[str],
    rank: int,
    *,
    key: jax.Array,
    dtype=None,
):
    """Add LoRA factors to every module of ``params`` whose path matches a target pattern.

    For each matching module holding ``kernel (..., d_in, d_out)`` (or ``embedding (vocab, d)``) adds
    ``lora_a (..., d_in, r) ~ U(-1/sqrt(d_in), 1/sqrt(d_in))`` and ``lora_b (..., r, d_out) = 0``, so
    ``merge(inject(p)) == p`` exactly. Leading axes (stacked layers) get independent factors.

    Boxed params (``nn.Partitioned`` / ``nn.LogicallyPartitioned`` leaves, as ``Transformer.init`` and
    ``Decoder.init`` return them) stay boxed, and each factor is boxed like its kernel: a kernel named
    ``(*lead, in, out)`` (e.g. ``("layers", "embed", "mlp")``) gives ``lora_a (*lead, in, None)`` and
    ``lora_b (*lead, None, out)`` (the rank axis is replicated), so
    :func:`jaxlab.distributed.param_shardings` still shards the adapted tree by name.

    Args:
      params: a (nested dict) param tree, e.g. ``model.init(...)["params"]``, boxed or unboxed.
      targets: regex or list of regexes, ``re.search``-ed against module paths like ``"block_0/attn/q"``.
      rank: LoRA rank ``r >= 1`` (at most ``min(d_in, d_out)``).
      key: PRNG key for ``A``.
      dtype: dtype of the factors (default: the kernel's).

    Returns:
      A new nested dict with the LoRA leaves added (the base leaves are shared, not copied).

    Raises:
      ValueError: no module matched, bad rank, or a matching module whose kernel is not at least 2-D.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> from jaxlab.nn import Transformer, TransformerConfig, causal_lm_loss
      >>> from jaxlab.nn.lora import inject, lora_modules, merge
      >>> model = Transformer(TransformerConfig(vocab=16, d_model=8, n_layers=1, n_heads=2, d_ff=16, max_len=8))
      >>> tokens = jnp.arange(8, dtype=jnp.int32).reshape(1, 8)
      >>> params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens)["params"])
      >>> p = inject(params, [r"attn/(q|v)$"], rank=2, key=jax.random.PRNGKey(1))
      >>> lora_modules(p), p["block_0"]["attn"]["q"]["lora_a"].shape
      (['block_0/attn/q', 'block_0/attn/v'], (8, 2))
      >>> jax.tree.all(jax.tree.map(jnp.array_equal, merge(p), params))   # lora_b = 0: exactly the base
      True
      >>> loss = lambda p: causal_lm_loss(model.apply({"params": merge(p)}, tokens), tokens)
      >>> g = jax.jit(jax.grad(loss))(p)["block_0"]["attn"]["q"]
      >>> bool(jnp.any(g["lora_b"] != 0))   # gradients reach the factors through merge
      True

      Boxed params (straight from ``init``) keep their logical names, the factors get derived ones:

      >>> boxed = model.init(jax.random.PRNGKey(0), tokens)["params"]
      >>> up = inject(boxed, r"mlp/up$", rank=2, key=jax.random.PRNGKey(1))["block_0"]["mlp"]["up"]
      >>> up["kernel"].names, up["lora_a"].names, up["lora_b"].names
      (('embed', 'mlp'), ('embed', None), (None, 'mlp'))
    """
    if isinstance(targets, str):
        targets = [targets]
    pats = [re.compile(t) for t in targets]
    flat = _flat(params)
    mods = {}
    for k, v in flat.items():
        if k[-1] in _BASE_LEAVES:
            mods[k[:-1]] = (k[-1], v)  # v may be boxed: its array is _value(v)
    chosen = [m for m in sorted(mods, key=slash_path) if any(p.search(slash_path(m)) for p in pats)]
    if not chosen:
        raise ValueError(
            f"lora.inject: no module matched targets {list(targets)}; modules with a kernel: "
            f"{[slash_path(m) for m in sorted(mods, key=slash_path)]}"
        )
    out = dict(flat)
    keys = jax.random.split(key, len(chosen))
    for m, kk in zip(chosen, keys):
        leaf, box = mods[m]
        w = _value(box)
        if w.ndim < 2:
            raise ValueError(
                f"lora.inject: leaf {slash_path(m + (leaf,))} has shape {tuple(w.shape)}; expected at least 2 "
                f"axes (..., d_in, d_out)"
            )
        d_in, d_out = w.shape[-2], w.shape[-1]
        if not 1 <= rank <= min(d_in, d_out):
            raise ValueError(
                f"lora.inject: rank={rank} for {slash_path(m + (leaf,))} of shape {tuple(w.shape)}; expected "
                f"1 <= rank <= min(d_in, d_out) = {min(d_in, d_out)}"
            )
        if m + ("lora_a",) in flat:
            raise ValueError(f"lora.inject: module {slash_path(m)} already has LoRA factors")
        dt = dtype or w.dtype
        a = _lora_a_init(kk, w.shape[:-2] + (d_in, rank), dt)
        b = jnp.zeros(w.shape[:-2] + (rank, d_out), dt)
        out[m + ("lora_a",)] = _factor_box(box, a, lambda n: n[:-1] + (None,))
        out[m + ("lora_b",)] = _factor_box(box, b, lambda n: n[:-2] + (None, n[-1]))
    return traverse_util.unflatten_dict(out)


def merge(params, *, alpha: float | None = None, rslora: bool = False):
    """Fold every LoRA pair back: ``kernel <- kernel + s * lora_a @ lora_b``; drop the LoRA leaves.

    Differentiable (use it inside the loss to train the factors through the unchanged base model).
    Boxed params (``nn.Partitioned`` leaves) give boxed params: each merged kernel keeps its box.

    Args:
      params: tree with LoRA factors (from :func:`inject` or :class:`LoRADense`), boxed or unboxed.
      alpha, rslora: the scale ``s`` (:func:`lora_scale` of each module's rank); must match training.

    Returns:
      A tree with the structure of the base model's params.

    Raises:
      ValueError: a module has ``lora_a`` without ``lora_b`` (or vice versa) or shapes that do not fit.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlab.nn.lora import merge
      >>> p = {"q": {"kernel": jnp.zeros((2, 3)), "lora_a": jnp.ones((2, 1)), "lora_b": jnp.ones((1, 3))}}
      >>> merge(p)["q"]["kernel"].tolist(), sorted(merge(p)["q"])   # s = alpha / r = 1
      ([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], ['kernel'])
      >>> merge(p, alpha=4.0)["q"]["kernel"][0, 0].item()           # s = 4 / 1
      4.0
    """
    flat = _flat(params)
    out = {k: v for k, v in flat.items() if k[-1] not in ("lora_a", "lora_b")}
    for k in flat:
        if k[-1] != "lora_a":
            continue
        m = k[:-1]
        if m + ("lora_b",) not in flat:
            raise ValueError(f"lora.merge: module {slash_path(m)} has lora_a but no lora_b")
        a, b = _value(flat[k]), _value(flat[m + ("lora_b",)])
        base = next((m + (n,) for n in _BASE_LEAVES if m + (n,) in flat), None)
        if base is None:
            raise ValueError(f"lora.merge: module {slash_path(m)} has LoRA factors but no kernel/embedding")
        w = _value(flat[base])
        if a.shape[-1] != b.shape[-2] or w.shape != a.shape[:-1] + b.shape[-1:]:
            raise ValueError(
                f"lora.merge: {slash_path(base)} {tuple(w.shape)}, lora_a {tuple(a.shape)}, lora_b "
                f"{tuple(b.shape)} do not fit; expected kernel (..., d_in, d_out) = lora_a (..., d_in, r) @ "
                f"lora_b (..., r, d_out)"
            )
        s = lora_scale(a.shape[-1], alpha, rslora)
        merged = w + (s * jnp.matmul(a, b)).astype(w.dtype)
        box = flat[base]
        out[base] = box.replace_boxed(merged) if isinstance(box, nn.meta.AxisMetadata) else merged
    for k in flat:
        if k[-1] == "lora_b" and k[:-1] + ("lora_a",) not in flat:
            raise ValueError(f"lora.merge: module {slash_path(k[:-1])} has lora_b but no lora_a")
    return traverse_util.unflatten_dict(out)


def trainable_mask(params):
    """A pytree of bools like ``params``: ``True`` exactly on ``lora_a``/``lora_b`` leaves.

    A boxed leaf (``nn.Partitioned``) gets a boxed bool, so the mask has the structure of ``params``
    (leaves are named by :func:`jaxlab.paths.leaf_name`, which looks through the box's ``.value``).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlab.nn.lora import trainable_mask
      >>> trainable_mask({"q": {"kernel": jnp.zeros((4, 2)), "lora_a": jnp.zeros((4, 1)), "lora_b": jnp.zeros((1, 2))}})
      {'q': {'kernel': False, 'lora_a': True, 'lora_b': True}}
    """

    return jax.tree_util.tree_map_with_path(lambda path, _: leaf_name(path) in ("lora_a", "lora_b"), params)


def freeze_base(tx: optax.GradientTransformation, params) -> optax.GradientTransformation:
    """Train only the LoRA factors with ``tx``; every other leaf gets a zero update (no weight decay).

    The result composes like any Optax transform, e.g.
    ``optax.chain(freeze_base(optax.adamw(1e-3, weight_decay=0.01), params), jaxlab.grasp(U, sides))``.

    Returns:
      ``optax.multi_transform({"lora": tx, "frozen": optax.set_to_zero()}, labels)``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jaxlab.nn.lora import freeze_base
      >>> params = {"q": {"kernel": jnp.ones((4, 2)), "lora_a": jnp.ones((4, 1)), "lora_b": jnp.ones((1, 2))}}
      >>> tx = freeze_base(optax.adamw(1e-3, weight_decay=0.01), params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> bool(jnp.all(updates["q"]["kernel"] == 0)), bool(jnp.all(updates["q"]["lora_b"] != 0))
      (True, True)
    """
    labels = jax.tree.map(lambda t: "lora" if t else "frozen", trainable_mask(params))
    return optax.multi_transform({"lora": tx, "frozen": optax.set_to_zero()}, labels)
