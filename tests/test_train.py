"""The shared fit loop: convergence, exact resume, atomic checkpoints, NaN guard, EMA, donation,
argument checks and data parallelism (2 forced host devices in a subprocess)."""

import os
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from geodiff.train import CHECKPOINT_NAME, TrainState, fit, load_checkpoint

W_TRUE = np.array([1.0, -2.0, 0.5], np.float32)


def _regression_data(n=128, poison=()):
    x = np.random.default_rng(0).normal(size=(n, 3)).astype(np.float32)
    y = x @ W_TRUE + 0.3
    y[list(poison)] = np.nan
    return {"x": x, "y": y}


def _mse(params, batch, key):
    return jnp.mean((batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2)


def _p0():
    return {"w": jnp.zeros(3), "b": jnp.zeros(())}


def _raw(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(x))
    return np.asarray(x)


def _bitwise_equal(a, b):
    la, lb = [_raw(x) for x in jax.tree.leaves(a)], [_raw(x) for x in jax.tree.leaves(b)]
    return (jax.tree.structure(a) == jax.tree.structure(b)
            and all(u.dtype == v.dtype and np.array_equal(u, v) for u, v in zip(la, lb)))


def test_linear_regression_converges(key):
    state, hist = fit(key, _mse, _p0(), _regression_data(), steps=300, batch_size=16,
                      learning_rate=0.05, progress=False)
    assert isinstance(state, TrainState) and state.step == 300 and state.n_bad == 0
    assert hist["loss"][-1] < hist["loss"][0] / 100
    np.testing.assert_allclose(state.params["w"], W_TRUE, atol=1e-3)
    np.testing.assert_allclose(state.params["b"], 0.3, atol=1e-3)
    assert hist["step"][-1] == 300 and len(hist["step"]) == len(hist["loss"]) == len(hist["time"]) == 30
    assert hist["compile_s"] > 0 and 0 < hist["step_s"] < hist["compile_s"]
    assert hist.n_bad == 0  # attribute access


def test_resume_is_bitwise_identical(key, tmp_path):
    data = _regression_data()
    kw = dict(batch_size=8, learning_rate=0.01, warmup_steps=5, ema_decay=0.9, progress=False,
              log_every=5)
    s1, _ = fit(key, _mse, _p0(), data, steps=10, checkpoint_dir=tmp_path, **kw)
    assert (tmp_path / CHECKPOINT_NAME).exists()
    resumed, h_res = fit(key, _mse, _p0(), data, steps=20, checkpoint_dir=tmp_path, **kw)
    straight, h_str = fit(key, _mse, _p0(), data, steps=20, **kw)
    assert resumed.step == straight.step == 20
    assert _bitwise_equal(resumed.params, straight.params)
    assert _bitwise_equal(resumed.opt_state, straight.opt_state)
    assert _bitwise_equal(resumed.ema, straight.ema)
    assert not _bitwise_equal(resumed.params, s1.params)
    assert h_res["step"] == h_str["step"] == [5, 10, 15, 20]
    assert h_res["loss"] == h_str["loss"]
    # Already complete: returns the checkpoint without training.
    again, h_again = fit(key, _mse, _p0(), data, steps=20, checkpoint_dir=tmp_path, **kw)
    assert again.step == 20 and _bitwise_equal(again.params, straight.params)
    # no step ran: the timings are those the finished checkpoint recorded, not NaN
    assert h_again["step_s"] == h_res["step_s"] > 0
    assert h_again["compile_s"] == h_res["compile_s"] > 0


def test_checkpoint_round_trips_exactly(key, tmp_path):
    state, hist = fit(key, _mse, _p0(), _regression_data(), steps=7, batch_size=8, ema_decay=0.5,
                      checkpoint_dir=tmp_path, checkpoint_every=3, progress=False)
    ck = load_checkpoint(tmp_path)
    assert ck["step"] == 7 and ck["n_bad"] == 0 and ck["history"]["step"] == [3, 6, 7]
    assert ck["config"]["batch_size"] == 8 and ck["versions"]["jax"] == jax.__version__
    np.testing.assert_array_equal(ck["params"]["w"], state.params["w"])
    # Without a template the optimizer state comes back as nested dicts keyed by path entries.
    adam = ck["opt_state"][1][0]
    assert int(adam["count"]) == 7
    np.testing.assert_array_equal(adam["mu"]["w"], state.opt_state[1][0].mu["w"])
    np.testing.assert_array_equal(adam["nu"]["b"], state.opt_state[1][0].nu["b"])
    like = load_checkpoint(tmp_path / CHECKPOINT_NAME, params_like=_p0())
    assert _bitwise_equal(like["params"], state.params) and _bitwise_equal(like["ema"], state.ema)
    assert np.array_equal(jax.random.key_data(like["key"]), jax.random.key_data(key))
    with pytest.raises(ValueError, match="does not match"):
        load_checkpoint(tmp_path, params_like={"w": jnp.zeros(4), "b": jnp.zeros(())})


def test_checkpoint_write_is_atomic(key, tmp_path, monkeypatch):
    data = _regression_data()
    before, _ = fit(key, _mse, _p0(), data, steps=5, batch_size=8, checkpoint_dir=tmp_path,
                    progress=False)

    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        fit(key, _mse, _p0(), data, steps=10, batch_size=8, checkpoint_dir=tmp_path,
            resume=False, progress=False)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == [CHECKPOINT_NAME]  # no partial/temporary files left
    ck = load_checkpoint(tmp_path, params_like=_p0())
    assert ck["step"] == 5 and _bitwise_equal(ck["params"], before.params)


def test_resume_structure_mismatch_raises(key, tmp_path):
    fit(key, _mse, _p0(), _regression_data(), steps=2, batch_size=8, checkpoint_dir=tmp_path,
        progress=False)
    other = {"w": jnp.zeros(3), "b": jnp.zeros(()), "extra": jnp.zeros(2)}
    with pytest.warns(UserWarning, match="different loss_fn"), \
            pytest.raises(ValueError, match="does not match the params"):
        fit(key, lambda p, b, k: _mse(p, b, k) + jnp.sum(p["extra"]), other, _regression_data(),
            steps=4, batch_size=8, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="past steps"):
        fit(key, _mse, _p0(), _regression_data(), steps=1, batch_size=8, checkpoint_dir=tmp_path,
            progress=False)


def test_nan_steps_are_skipped_and_counted(key):
    poison = (3, 50, 77, 100)
    n, b, steps = 128, 8, 300
    state, hist = fit(key, _mse, _p0(), _regression_data(n, poison), steps=steps, batch_size=b,
                      learning_rate=0.05, progress=False)
    # The batches are a function of (key, step): count the poisoned ones independently.
    expected = 0
    for s in range(steps):
        k_batch, _ = jax.random.split(jax.random.fold_in(key, s))
        idx = np.asarray(jax.random.randint(k_batch, (b,), 0, n))
        expected += bool(np.isin(idx, poison).any())
    assert 0 < state.n_bad == hist["n_bad"] == expected < steps
    assert all(np.isfinite(hist["loss"]))
    assert np.all(np.isfinite(np.asarray(state.params["w"])))
    np.testing.assert_allclose(state.params["w"], W_TRUE, atol=1e-3)


def test_max_bad_steps_raises(key, tmp_path):
    def nan_loss(p, batch, k):
        return jnp.sum(p["w"]) * jnp.nan

    with pytest.raises(FloatingPointError, match="consecutive steps"):
        fit(key, nan_loss, _p0(), _regression_data(), steps=50, batch_size=4, max_bad_steps=5,
            log_every=5, checkpoint_dir=tmp_path, progress=False)
    ck = load_checkpoint(tmp_path, params_like=_p0())  # last finite state saved before raising
    assert ck["step"] == 5 and ck["n_bad"] == 5 and np.all(ck["params"]["w"] == 0)


def test_ema_matches_hand_computation(key):
    lr, decay, steps = 0.1, 0.8, 25
    data = np.full((4, 3), 2.0, np.float32)  # constant data: gradient of sum(w * mean(x)) is 2

    def lin(p, batch, k):
        return jnp.sum(p["w"] * jnp.mean(batch, axis=0))

    p0 = {"w": jnp.array([1.0, 0.0, -1.0])}
    state, _ = fit(key, lin, p0, data, steps=steps, batch_size=2, optimizer=optax.sgd(lr),
                   clip_norm=None, ema_decay=decay, progress=False)
    w, ema = np.array([1.0, 0.0, -1.0]), np.array([1.0, 0.0, -1.0])
    for t in range(steps):
        w = w - lr * 2.0
        d = min(decay, (1 + t) / (10 + t))
        ema = d * ema + (1 - d) * w
    np.testing.assert_allclose(state.params["w"], w, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(state.ema["w"], ema, rtol=1e-5, atol=1e-6)


def test_donation_leaves_caller_arrays_intact(key):
    p0 = _p0()
    data = jax.tree.map(jnp.asarray, _regression_data())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "Some donated buffers were not usable"
        s1, _ = fit(key, _mse, p0, data, steps=5, batch_size=8, ema_decay=0.9, progress=False)
        s2, _ = fit(key, _mse, p0, data, steps=5, batch_size=8, ema_decay=0.9, progress=False)
    assert not any(x.is_deleted() for x in jax.tree.leaves((p0, data)))
    np.testing.assert_array_equal(p0["w"], np.zeros(3))
    assert _bitwise_equal(s1.params, s2.params)
    assert float(_mse(s1.params, data, key)) < float(_mse(p0, data, key))


def test_nnx_state_with_aux_and_non_float_leaves(key, tmp_path):
    from flax import nnx

    model = nnx.Sequential(nnx.Linear(3, 1, rngs=nnx.Rngs(0)), nnx.Dropout(0.0, rngs=nnx.Rngs(1)))
    graphdef, params = nnx.split(model)  # holds an RngKey and an RngCount besides the Params
    data = _regression_data()

    def loss(p, batch, k):
        pred = nnx.merge(graphdef, p)(batch["x"])[:, 0]
        err = jnp.mean((pred - batch["y"]) ** 2)
        return err, {"mae": jnp.mean(jnp.abs(pred - batch["y"]))}

    kw = dict(batch_size=16, learning_rate=0.05, has_aux=True, progress=False, log_every=20)
    state, hist = fit(key, loss, params, data, steps=40, checkpoint_dir=tmp_path, **kw)
    assert len(hist["mae"]) == 2 and hist["mae"][-1] < hist["mae"][0]
    frozen = [x for x in jax.tree.leaves(params) if not jnp.issubdtype(x.dtype, jnp.floating)]
    assert len(frozen) == 2  # the key and the counter are carried through unchanged
    assert _bitwise_equal(frozen, [x for x in jax.tree.leaves(state.params)
                                   if not jnp.issubdtype(x.dtype, jnp.floating)])
    ck = load_checkpoint(tmp_path, params_like=params)
    assert _bitwise_equal(ck["params"], state.params)
    resumed, _ = fit(key, loss, params, data, steps=60, checkpoint_dir=tmp_path, **kw)
    straight, _ = fit(key, loss, params, data, steps=60, **kw)
    assert _bitwise_equal(resumed.params, straight.params)


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps"),
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=1000), "batch_size"),
    (dict(ema_decay=1.0), "ema_decay"),
    (dict(clip_norm=0.0), "clip_norm"),
    (dict(log_every=0), "log_every"),
    (dict(max_bad_steps=0), "max_bad_steps"),
    (dict(learning_rate=-1.0), "learning_rate"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(optimizer="adam"), "GradientTransformation"),
    (dict(devices=[]), "devices"),
    (dict(has_aux=True), "has_aux"),
])
def test_bad_arguments_raise(key, kwargs, match):
    args = dict(steps=3, batch_size=4, progress=False) | kwargs
    with pytest.raises(ValueError, match=match):
        fit(key, _mse, _p0(), _regression_data(), **args)


def test_bad_losses_and_data_raise(key):
    with pytest.raises(ValueError, match="scalar"):
        fit(key, lambda p, b, k: b["x"] @ p["w"], _p0(), _regression_data(), steps=2,
            batch_size=4, progress=False)
    with pytest.raises(ValueError, match="has_aux=True"):
        fit(key, lambda p, b, k: (_mse(p, b, k), {}), _p0(), _regression_data(), steps=2,
            batch_size=4, progress=False)
    with pytest.raises(ValueError, match="leading example axis"):
        fit(key, _mse, _p0(), {"x": np.zeros((5, 3)), "y": np.zeros(4)}, steps=2, batch_size=2,
            progress=False)
    with pytest.raises(ValueError, match="floating-point"):
        fit(key, _mse, {"w": jnp.zeros(3, int)}, _regression_data(), steps=2, batch_size=2,
            progress=False)


_DATA_PARALLEL = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from geodiff.train import fit
    assert jax.local_device_count() == 2, jax.local_devices()
    x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
    data = {"x": x, "y": x @ np.array([1.0, -2.0, 0.5], np.float32)}
    def loss(p, b, k):   # uses the key: the noise must not depend on the sharding
        noise = 0.01 * jax.random.normal(k, b["y"].shape)
        return jnp.mean((b["x"] @ p["w"] - b["y"] + noise) ** 2)
    p0 = {"w": jnp.zeros(3)}
    kw = dict(steps=12, batch_size=8, learning_rate=0.05, ema_decay=0.9, log_every=3, progress=False)
    two, h2 = fit(jax.random.key(1), loss, p0, data, devices=jax.local_devices(), **kw)
    one, h1 = fit(jax.random.key(1), loss, p0, data, devices=jax.local_devices()[:1], **kw)
    assert len(two.params["w"].sharding.device_set) == 2
    assert not p0["w"].is_deleted()  # replicating onto the mesh must not alias (then donate) it
    np.testing.assert_allclose(h2["loss"], h1["loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(two.params["w"], one.params["w"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(two.ema["w"], one.ema["w"], rtol=1e-5, atol=1e-6)
    # A checkpoint written on 2 devices resumes on 1 (equal to float tolerance, not bitwise).
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        fit(jax.random.key(1), loss, p0, data, checkpoint_dir=d, devices=jax.local_devices(),
            **(kw | {"steps": 6}))
        res, _ = fit(jax.random.key(1), loss, p0, data, checkpoint_dir=d,
                     devices=jax.local_devices()[:1], **kw)
    np.testing.assert_allclose(res.params["w"], one.params["w"], rtol=1e-5, atol=1e-6)
    try:
        fit(jax.random.key(1), loss, p0, data, steps=2, batch_size=3, progress=False)
    except ValueError as e:
        assert "divisible" in str(e)
    else:
        raise AssertionError("batch_size 3 on 2 devices did not raise")
    print("DATA-PARALLEL-OK")
""")


def test_data_parallel_matches_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _DATA_PARALLEL], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "DATA-PARALLEL-OK" in out.stdout, out.stderr[-3000:]


def test_frozen_arrays_reach_the_loss_untrained(key):
    """``frozen`` is passed as a fourth argument, used by the loss, and never updated."""
    def loss(params, batch, k, frozen):
        return jnp.mean((batch["x"] @ (params["w"] * frozen["scale"]) + params["b"] - batch["y"]) ** 2)

    frozen = {"scale": jnp.asarray([2.0, 2.0, 2.0])}
    state, _ = fit(key, loss, _p0(), _regression_data(), steps=300, batch_size=16,
                   learning_rate=0.05, progress=False, frozen=frozen)
    np.testing.assert_allclose(state.params["w"], W_TRUE / 2, atol=1e-3)
    np.testing.assert_array_equal(frozen["scale"], [2.0, 2.0, 2.0])
    with pytest.raises(TypeError):   # a three-argument loss cannot take frozen arrays
        fit(key, _mse, _p0(), _regression_data(), steps=2, batch_size=4, progress=False,
            frozen=frozen)
