"""Smoke runs of the MeanFlow experiments and benchmark (slow: they train small models)."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses (flax modules) resolve string annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_meanflow_2d_batches_pair_noise_by_ot():
    """``coupling: exact`` re-pairs the batch noise (a permutation of the independent draw, lower total cost);
    ``independent`` keeps the data-only batch (the loss draws its noise), as in the v1/v2 runs."""
    import jax

    run = _load(ROOT / "experiments/meanflow_2d/run.py", "mf2d_run_batch")
    sampler = run.jaxlab.data.toy2d_sampler("two_moons")
    key = jax.random.PRNGKey(3)
    b = run.make_batch(sampler, 64, "exact")(key)  # eager: bitwise comparable with the draws below
    kx, ke, _ = jax.random.split(key, 3)
    np.testing.assert_array_equal(b["x"], sampler(kx, 64))
    e = np.asarray(jax.random.normal(ke, (64, 2)))
    assert sorted(map(tuple, np.asarray(b["noise"]).tolist())) == sorted(map(tuple, e.tolist()))
    cost = lambda n: float(np.sum((np.asarray(b["x"]) - n) ** 2))
    assert cost(np.asarray(b["noise"])) < 0.8 * cost(e)
    ind = run.make_batch(sampler, 64, "independent")(key)
    assert set(ind) == {"x"} and np.array_equal(ind["x"], sampler(key, 64))
    with pytest.raises(ValueError, match="coupling must be"):
        run.make_batch(sampler, 64, "ot")


@pytest.mark.slow
def test_meanflow_2d_writes_report(tmp_path):
    run = _load(ROOT / "experiments/meanflow_2d/run.py", "mf2d_run")
    assert run.main(["--quick", "--steps", "30", "--set", "datasets=[eight_gaussians, two_moons]",
                     "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["results"]) == {"eight_gaussians", "two_moons"}
    assert set(res["results"]["two_moons"]) == {"0", "0.25", "0.5", "0.75", "0.9", "0.94", "1", "auto"}
    assert {"sw2_1", "mmd_1", "energy_1", "sw2_2", "mmd_2"} <= set(res["results"]["two_moons"]["1"])
    # The flow-matching reference: one value per seed for each metric, and the data-vs-data floor.
    ref = res["reference"]["two_moons"]
    assert len(ref["sw2_fm"]) == len(ref["mmd_fm"]) == len(res["results"]["two_moons"]["1"]["sw2_1"])
    assert set(ref["floor"]) == {"sw2", "mmd", "energy"}
    ratio = res["summary"]["one_step_vs_flow_matching"]["two_moons"]["ratio_1nfe"]["sw2"]["1"]
    assert ratio == pytest.approx(np.mean(res["results"]["two_moons"]["1"]["sw2_1"]) / np.mean(ref["sw2_fm"]))
    o = res["oracle"]
    # The exact target MSE is a quadratic in lam minimised at the reported lam*.
    i = min(range(len(o["lams"])), key=lambda k: o["target_mse"][k])
    assert abs(o["lams"][i] - min(max(o["lam_star"], 0.0), 1.0)) <= 0.05 + 1e-9
    for f in ("report.md", "metric_vs_coefficient.png", "samples_1step.png", "auto_coefficient.png", "oracle.png"):
        assert (tmp_path / f).exists(), f


@pytest.mark.slow
def test_meanflow_digits_v1_writes_report(tmp_path):
    run = _load(ROOT / "experiments/meanflow_digits/run.py", "mfdigits_run")
    assert run.main(["--quick", "--steps", "20", "--overlay", str(ROOT / "experiments/meanflow_digits/v1.yaml"),
                     "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["classifier_accuracy"] > 0.9
    assert "MeanFlow lam=auto @ 1 NFE" in res["fd"] and (tmp_path / "samples.png").exists()


@pytest.mark.slow
def test_meanflow_digits_v2_writes_report(tmp_path):
    run = _load(ROOT / "experiments/meanflow_digits/run.py", "mfdigits_run")
    assert run.main(["--quick", "--steps", "8", "--seeds", "2", "--set", "classifier.steps=200",
                     "--set", "sweep.coefficients=[0.0, 0.5, 1.0]", "--set", "sweep.grad_var.batches=3",
                     "--set", "eval.n=200", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["protocol"] == "v2" and res["checkpoint_steps"] == [2, 4, 6, 8]
    assert set(res["fd_1nfe"]) == {"ω = 2", "ω = 1"}
    for step in ("2", "8"):
        by = res["fd_1nfe"]["ω = 2"][step]
        assert set(by) == {"0", "0.5", "1"} and all(len(v) == 2 for v in by.values())
        own, shared = res["grad_var"]["own_var_mse"][step], res["grad_var"]["shared_var_mse"][step]
        assert all(x > 0 for v in own.values() for x in v)
        # At lam = 1 the "shared" (lam = 1 params) measurement is the own one.
        assert shared["1"] == own["1"]
    assert {v["answer"].split()[0] for v in res["verdicts"].values()} <= {"YES", "NO", "PARTLY"}
    for f in ("report.md", "coefficient_sweep.png", "samples.png"):
        assert (tmp_path / f).exists(), f


def test_meanflow_digits_verdicts_follow_the_numbers():
    run = _load(ROOT / "experiments/meanflow_digits/run.py", "mfdigits_run")
    lams = [0.0, 0.5, 1.0]
    # Two checkpoints, three seeds; seed-means: step 1 FD 3 > 2 > 1 (monotone, best at 1), step 2 FD 2 < 3 > 1.
    fd = {1: {"0": [3.0, 3.1, 2.9], "0.5": [2.0, 2.1, 1.9], "1": [1.0, 1.1, 0.9]},
          2: {"0": [2.0, 2.1, 1.9], "0.5": [3.0, 3.1, 2.9], "1": [1.0, 1.1, 0.9]}}
    b, c = run.verdict_prefers_one(fd, lams), run.verdict_monotone(fd, lams)
    assert b["answer"] == "YES" and all(p["resolved"] for p in b["per_checkpoint"])
    assert c["answer"] == "PARTLY" and [p["direction"] for p in c["per_checkpoint"]] == ["decreasing", "not monotone"]
    gv = {1: {"0": [2.0, 2.2, 2.1], "0.5": [1.0, 1.1, 1.2], "1": [1.5, 1.6, 1.7]},
          2: {"0": [2.0, 2.2, 2.1], "0.5": [3.0, 3.1, 3.2], "1": [1.5, 1.6, 1.7]}}
    a = run.verdict_interior_minimum(gv, lams)
    assert a["answer"] == "PARTLY" and [p["argmin"] for p in a["per_checkpoint"]] == [0.5, 1.0]
    assert a["per_checkpoint"][0]["resolved"] is True
    inc = {1: {"0": [1.0], "0.5": [2.0], "1": [3.0]}}
    assert run.verdict_monotone(inc, lams)["answer"].startswith("NO (monotone")
    assert run.verdict_prefers_one(inc, lams)["answer"] == "NO"


# slow: 27 s on the 2-core box, nearly all compiling three iMF-DiT JVP graphs; the default suite's budget is
# ~10 min (`make test-slow` runs it).
@pytest.mark.slow
def test_meanflow_digits_grad_variance_matches_stacked_gradients():
    """The Welford two-cotangent estimator equals the sample variance of explicitly computed gradients."""
    import dataclasses
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxlab.losses import MeanFlowConfig, meanflow_init_state, meanflow_loss
    from jaxlab.nn import DiT

    run = _load(ROOT / "experiments/meanflow_digits/run.py", "mfdigits_run")
    model = DiT(patch=4, hidden=8, depth=1, heads=2, time_dim=8, time_scale=1.0, num_classes=10,
                guidance_conditioning=True, aux_v_head=True)
    cfg = MeanFlowConfig.imf(num_classes=10)
    xs = jax.random.normal(jax.random.PRNGKey(0), (20, 8, 8, 1))
    ys = jnp.arange(20) % 10
    params = model.init(jax.random.PRNGKey(1), xs[:2], jnp.zeros(2), jnp.zeros(2), ys[:2])
    params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(2), a.shape), params)  # not zero-out
    K, B, lam = 3, 8, 0.25
    keys = jax.random.split(jax.random.PRNGKey(3), K)
    stats = run.make_grad_variance(model, cfg, xs, ys, K, B)(
        jax.tree.map(lambda a: a[None], params), jnp.asarray([lam]), keys[None])
    c = dataclasses.replace(cfg, jvp_cond_weight=lam)

    @functools.partial(jax.jit, static_argnums=3)
    def ref_grad(p, idx, kl, name):
        def f(q):
            loss, aux = meanflow_loss(model.apply, q, xs[idx], kl, config=c, y=ys[idx], loss_state=meanflow_init_state(c))
            return loss if name == "loss" else aux["mse_mf"] * 64

        return jax.grad(f)(p)

    for name in ("loss", "mse"):
        gs = []
        for key in keys:
            kb, kl = jax.random.split(key)
            idx = jax.random.randint(kb, (B,), 0, xs.shape[0])
            gs.append(np.concatenate([np.ravel(g) for g in jax.tree.leaves(ref_grad(params, idx, kl, name))]))
        gs = np.stack(gs).astype(np.float64)
        want = np.sum((gs - gs.mean(0)) ** 2) / (K - 1)
        np.testing.assert_allclose(float(stats[f"var_{name}"][0]), want, rtol=2e-3)
        np.testing.assert_allclose(float(stats[f"mean_sq_{name}"][0]), np.sum(gs.mean(0) ** 2), rtol=2e-3)
