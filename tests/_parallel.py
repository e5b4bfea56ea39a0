"""Shared harness: run the same train step single-device, under pmap, on an 8-device mesh (DP and
FSDP) and under shard_map, and return the final states so tests can compare them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlab.distributed import make_mesh
from jaxlab.distributed.sharding import batch_sharding
from jaxlab.nm import nm_leaf_axes, nm_mask
from jaxlab.training import TrainState, make_train_step, state_shardings
from jaxlab.training.train_step import make_pmap_train_step, make_shard_map_train_step

MODES = ("single", "pmap", "mesh_dp", "mesh_fsdp", "shard_map")

# nm_mask under jit: one compile per leaf shape instead of eager dispatch of its m (m - 1) compares
_nm_mask_jit = jax.jit(nm_mask, static_argnums=(1, 2, 3))


class TraceCounter:
    """Wrap a loss_fn and count how often it is traced (== compilations of the step)."""

    def __init__(self, fn):
        self.fn, self.count = fn, 0

    def __call__(self, *args):
        self.count += 1
        return self.fn(*args)


def run_mode(mode, loss_fn, tx, params, batches, devices, *, forward_params_fn=None, has_loss_state=False,
             loss_state=None, rng=0, on_step=None):
    """Run ``len(batches)`` steps in ``mode``; returns ``(final_state, trace_count, step_fn_outputs)``.

    ``on_step(state)``, if given, is called after every step with the state (for pmap: device 0's copy),
    e.g. to record the params trajectory.
    """
    seen = on_step or (lambda s: None)
    counter = TraceCounter(loss_fn)
    kw = dict(forward_params_fn=forward_params_fn, has_loss_state=has_loss_state)
    state = TrainState.create(params=params, tx=tx, rng=rng, loss_state=loss_state)
    n = len(devices)
    if mode == "single":
        step = make_train_step(counter, tx, **kw)
        with jax.default_device(devices[0]):
            for b in batches:
                state, _ = step(state, b)
                seen(state)
        return state, counter.count, None
    if mode == "pmap":
        step = make_pmap_train_step(counter, tx, devices=devices, **kw)
        rep = jax.tree.map(lambda x: np.stack([np.asarray(x)] * n), state)  # leading device axis
        rep = jax.pmap(lambda s: s, axis_name="batch", devices=devices)(rep)  # on device, as the step's outputs will be
        for b in batches:
            rep, _ = step(rep, jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), b))
            seen(jax.tree.map(lambda x: x[0], rep))
        return jax.tree.map(lambda x: x[0], rep), counter.count, None
    if mode == "shard_map":
        mesh = make_mesh(data=n, devices=devices)
        step = make_shard_map_train_step(counter, tx, mesh, **kw)
        state = jax.device_put(state, NamedSharding(mesh, P()))  # replicated, as the outputs will be
        for b in batches:
            state, _ = step(state, b)
            seen(state)
        return state, counter.count, None
    mesh = make_mesh(data=n, devices=devices) if mode == "mesh_dp" else make_mesh(data=1, fsdp=n, devices=devices)
    abstract = jax.eval_shape(lambda: state)
    sh = state_shardings(abstract, tx, mesh)
    state = jax.device_put(state, sh)
    step = make_train_step(counter, tx, mesh=mesh, state_sharding=sh, **kw)
    shardings_ok = True
    for b in batches:
        b = jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, np.ndim(x))), b)
        state, _ = step(state, b)
        seen(state)
        got = jax.tree.leaves(jax.tree.map(lambda x: x.sharding, state.opt_state))
        want = jax.tree.leaves(sh.opt_state)
        shardings_ok &= all(g.is_equivalent_to(w, np.ndim(x)) for g, w, x in
                            zip(got, want, jax.tree.leaves(state.opt_state)))
    return state, counter.count, {"opt_state_shardings_kept": shardings_ok, "shardings": sh}


def assert_close(a, b, rtol=2e-5, atol=2e-6, what=""):
    lb = jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b), what
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], lb):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol,
                                   err_msg=f"{what} {jax.tree_util.keystr(path)}")


def _nm_leaves(params, n, m):
    """``[(path, axis, |w| grouped as (groups, m, rest))]`` for the N:M leaves of ``params`` (default rule)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    axes = jax.tree_util.tree_structure(params).flatten_up_to(nm_leaf_axes(params, m, n=n))
    out = []
    for (path, w), a in zip(flat, axes):
        if a is not None:
            g = np.moveaxis(np.abs(np.asarray(w, np.float64)), a, 0)
            out.append((jax.tree_util.keystr(path), a, g.reshape((g.shape[0] // m, m, -1))))
    return out


def min_nm_gap(trajectory, n, m):
    """Smallest gap between the ``n``-th and ``(n+1)``-th largest |w| in any group of ``m`` on any N:M
    leaf of any params in ``trajectory``; returns ``(gap, where)``, ``where`` naming leaf, group and step."""
    best = (np.inf, "")
    for t, params in enumerate(trajectory):
        for path, a, g in _nm_leaves(params, n, m):
            s = -np.sort(-g, axis=1)
            gap = s[:, n - 1] - s[:, n]
            i = np.unravel_index(np.argmin(gap), gap.shape)
            if gap[i] < best[0]:
                best = (float(gap[i]), f"leaf {path}, group {i[0]} along axis {a} (position {i[1]} of the other "
                                       f"axes), params before update {t + 1}: |w| = {g[i[0], :, i[1]]}")
    return best


def assert_same_nm_masks(ref_trajectory, trajectory, n, m, what=""):
    """Assert both runs take the same N:M mask (:func:`jaxlab.nm.nm_mask`, default leaf rule) of every
    params in the trajectories; a difference is reported as a mask flip, naming the leaf, the step,
    the group and both groups' |w| (a flip explains any value difference that follows it)."""
    for t, (pa, pb) in enumerate(zip(ref_trajectory, trajectory, strict=True)):
        for (path, a, ga), (_, _, gb) in zip(_nm_leaves(pa, n, m), _nm_leaves(pb, n, m), strict=True):
            keep = lambda g: np.asarray(_nm_mask_jit(jnp.asarray(g), n, m, 1)).reshape(g.shape)  # groups on axis 1
            ka, kb = keep(ga), keep(gb)
            flips = np.argwhere(np.any(ka != kb, axis=1))
            if len(flips):
                gi, col = flips[0]
                raise AssertionError(
                    f"{what}: N:M mask flip at leaf {path}, group {gi} (entries {gi * m}..{gi * m + m - 1} along "
                    f"axis {a}, position {col} of the other axes), params before update {t + 1} ({len(flips)} "
                    f"group(s) differ): the reference keeps slots {np.flatnonzero(ka[gi, :, col])} of |w| = "
                    f"{ga[gi, :, col]}, this mode keeps {np.flatnonzero(kb[gi, :, col])} of |w| = {gb[gi, :, col]}")
