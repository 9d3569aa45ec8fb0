"""The shared fit loop: one small function that trains any pure loss over a pytree of parameters.

:func:`fit` knows no model. A flax.nnx model is handled by its caller: ``graphdef, params =
nnx.split(model)``, a loss ``loss_fn(params, batch, key)`` that calls ``nnx.merge(graphdef, params)``
inside, and ``nnx.merge(graphdef, state.params)`` on the result. The loop only sees pytrees.

What the loop does, once, for every layer above it (diffusion prior, amortized flow, baselines):

* draws each batch on the device from data kept there, with a key derived from the step number
  (so a resumed run sees exactly the batches an uninterrupted run would have seen);
* runs one jitted step that donates the parameters and optimizer state;
* skips, inside the jitted step, any update whose loss or gradient norm is not finite
  (the NaN guard), and stops after ``max_bad_steps`` consecutive skipped steps;
* keeps an optional exponential moving average (EMA) of the parameters;
* writes atomic checkpoints and resumes from them bit for bit;
* shards the batch over several devices (data parallelism) when there are several;
* shows a progress bar and returns a history of the loss, with compile time and step time apart.

Dimension letters: N examples in the data set, B batch (``batch_size``), D devices.

Checkpoint format (one file, ``<checkpoint_dir>/checkpoint.npz``, replaced atomically):

* ``__meta__``: a 0-d string array holding JSON: ``format`` (version), ``step``, ``n_bad``,
  ``bad_run`` (current run of consecutive skipped steps), ``config`` (the fit arguments that matter),
  ``versions`` (geodiff, jax, jaxlib, optax, flax, numpy, python), ``history`` (as returned by
  :func:`fit`) and ``trees``: for each saved pytree (``params``, ``opt_state``, ``ema`` or null,
  ``key``) a list with one entry per leaf in ``jax.tree_util`` flattening order: ``path``
  (``keystr``), ``keys`` (the path as a list of dict keys / attribute names / indices), ``shape``
  and ``dtype``.
* ``<tree>/<i>`` (e.g. ``params/000003``): the i-th leaf as a NumPy array. PRNG-key leaves are stored
  as their raw ``key_data`` (dtype recorded as ``key<impl>``); dtypes NumPy cannot store natively
  (bfloat16, ...) are stored as their bits (unsigned integers of the same width).

The pytree *structure* is not pickled: on resume it comes from the ``params`` passed to :func:`fit`
(and ``optimizer.init``), and the file is checked against it leaf by leaf (path, shape, dtype).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from geodiff._cache import atomic_savez

__all__ = ["TrainState", "History", "fit", "load_checkpoint", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "checkpoint.npz"
FORMAT_VERSION = 1
_META = "__meta__"
_HISTORY_LISTS = ("step", "loss", "grad_norm", "time")
# Config entries that change the numbers of a run; a resumed run that differs in one gets a warning.
_RESUME_CHECKED = ("batch_size", "optimizer", "learning_rate", "warmup_steps", "clip_norm",
                   "ema_decay", "has_aux", "data", "loss_fn")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything needed to continue training (a pytree).

    Attributes:
        params: the trained parameters (same structure as the ``params`` given to :func:`fit`).
        opt_state: the optimizer state (``optimizer.init`` of the trainable leaves of ``params``).
        step: optimizer steps taken so far (skipped steps included), a Python int.
        ema: exponential moving average of ``params`` (same structure), or None.
        n_bad: total steps whose update was skipped by the NaN guard, a Python int.
        key: the base PRNG key; step s uses ``jax.random.fold_in(key, s)``.
    """

    params: Any
    opt_state: Any
    step: int
    ema: Any
    n_bad: int
    key: Any


class History(dict):
    """Training history: a dict (JSON-serialisable) whose entries also read as attributes.

    Lists, one entry per logged step (every ``log_every`` steps, every checkpoint, the last step):
        step: the step number (1-based: the number of steps taken when it was logged).
        loss: mean loss over the finite steps since the previous entry (NaN if none was finite).
        grad_norm: mean global gradient norm (before clipping) over the same steps.
        time: wall seconds since training started (summed over resumed calls; checkpoint writes
            included).
        <aux name>: with ``has_aux=True``, the mean of each auxiliary scalar over the same steps.
    Scalars:
        n_bad: total skipped (non-finite) steps.
        compile_s: wall seconds of the first step of the latest call (includes JIT compilation).
        step_s: median wall seconds per step after the first one of the latest call (compilation
            and checkpoint writes excluded). If that call ran fewer than two steps (e.g. it found
            a finished checkpoint), the value the checkpoint recorded; NaN if there is none.
    """

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


# ---------------------------------------------------------------------------------------- helpers
def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _is_trainable(x) -> bool:
    """Floating (or complex) array leaves are trained; integer, boolean and key leaves are carried."""
    return hasattr(x, "dtype") and not _is_key(x) and jnp.issubdtype(x.dtype, jnp.inexact)


def _trainable(params):
    """``params`` with every non-trainable leaf replaced by None (an empty subtree)."""
    return jax.tree.map(lambda x: x if _is_trainable(x) else None, params)


def _merge(trainable, params):
    """Put the (updated) trainable leaves back into ``params``."""
    return jax.tree.map(lambda t, x: x if t is None else t, trainable, params,
                        is_leaf=lambda t: t is None)


def _select(ok, new, old):
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def _versions() -> dict:
    out = {}
    for name in ("geodiff", "jax", "jaxlib", "optax", "flax", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


def _n_examples(data) -> int:
    leaves = jax.tree.leaves(data)
    if not leaves:
        raise ValueError("data must be a non-empty pytree of arrays with a leading example axis N")
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if None in sizes:
        raise ValueError("every leaf of data needs a leading example axis N (got a 0-d leaf)")
    if len(sizes) != 1:
        raise ValueError(f"all leaves of data must share the leading example axis N, got sizes "
                         f"{sorted(sizes)}")
    return sizes.pop()


def _default_optimizer(learning_rate: float, warmup_steps: int) -> optax.GradientTransformation:
    """Adam with a linear warm-up: lr_k = learning_rate · min(1, (k + 1) / warmup_steps)."""
    if warmup_steps == 0:
        return optax.adam(learning_rate)
    lr, w = float(learning_rate), float(warmup_steps)
    return optax.adam(lambda count: lr * jnp.minimum(1.0, (count + 1) / w))


def _describe(leaf) -> tuple[list, str]:
    """(shape, dtype name) of an array-like or ShapeDtypeStruct leaf; keys as ``key<impl>``."""
    if _is_key(leaf):
        return list(leaf.shape), f"key<{jax.random.key_impl(leaf)}>"
    if not hasattr(leaf, "dtype"):
        leaf = np.asarray(leaf)
    return list(leaf.shape), np.dtype(leaf.dtype).name


def _path_keys(path) -> list:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                v = getattr(k, attr)
                out.append(v if isinstance(v, (int, str)) else str(v))
                break
        else:
            out.append(str(k))
    return out


def _to_numpy(leaf) -> np.ndarray:
    """A leaf as a NumPy array that ``np.savez`` stores losslessly."""
    if _is_key(leaf):
        return np.asarray(jax.random.key_data(leaf))
    a = np.asarray(leaf)
    if np.lib.format.descr_to_dtype(np.lib.format.dtype_to_descr(a.dtype)) != a.dtype:
        a = a.view(f"uint{8 * a.dtype.itemsize}")  # e.g. bfloat16: keep the bits
    return a


def _from_numpy(a: np.ndarray, dtype: str):
    if dtype.startswith("key<"):
        return jax.random.wrap_key_data(a, impl=dtype[4:-1])
    dt = np.dtype(jnp.dtype(dtype))
    return a.view(dt) if a.dtype != dt else a


def _pack_tree(name: str, tree, arrays: dict) -> list[dict]:
    entries = []
    for i, (path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(tree)[0]):
        shape, dtype = _describe(leaf)
        entries.append({"path": jax.tree_util.keystr(path), "keys": _path_keys(path),
                        "shape": shape, "dtype": dtype})
        arrays[f"{name}/{i:06d}"] = _to_numpy(leaf)
    return entries


def _unpack_leaves(name: str, entries: list[dict], arrays) -> list:
    return [_from_numpy(arrays[f"{name}/{i:06d}"], e["dtype"]) for i, e in enumerate(entries)]


def _unflatten_like(name: str, entries: list[dict], leaves: list, like, source) -> Any:
    """Leaves read from a checkpoint, in the structure of ``like``; clear error on any mismatch."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(like)
    want = [(jax.tree_util.keystr(p), *_describe(x)) for p, x in flat]
    have = [(e["path"], e["shape"], e["dtype"]) for e in entries]
    if want != have:
        lines = [f"checkpoint {source} does not match the {name} given: {len(have)} leaves saved, "
                 f"{len(want)} expected"]
        for w, h in zip(want, have):
            if w != h:
                lines.append(f"  first difference: saved {h[0]} {h[1]} {h[2]}, expected "
                             f"{w[0]} {w[1]} {w[2]}")
                break
        else:
            extra = want[len(have):] or have[len(want):]
            lines.append(f"  first unmatched leaf: {extra[0][0]}")
        lines.append("  (use resume=False or another checkpoint_dir to start afresh)")
        raise ValueError("\n".join(lines))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _nested(entries: list[dict], leaves: list):
    """Leaves as nested dicts keyed by their path entries (a single leaf at the root stays bare)."""
    if len(entries) == 1 and not entries[0]["keys"]:
        return leaves[0]
    root: dict = {}
    for e, leaf in zip(entries, leaves):
        node = root
        for k in e["keys"][:-1]:
            node = node.setdefault(k, {})
        node[e["keys"][-1]] = leaf
    return root


def _checkpoint_file(path) -> Path:
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() or path.suffix != ".npz" else path


def _read_checkpoint(path) -> tuple[dict, Any]:
    path = _checkpoint_file(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    arrays = np.load(path, allow_pickle=False)
    meta = json.loads(str(arrays[_META]))
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} has format {meta.get('format')}, this geodiff reads "
                         f"format {FORMAT_VERSION}")
    return meta, arrays


def _write_checkpoint(path: Path, carry: dict, key, history: dict, config: dict) -> None:
    host = jax.device_get({k: carry[k] for k in ("params", "opt_state", "ema", "step", "n_bad",
                                                  "bad_run")})
    arrays: dict = {}
    trees = {name: _pack_tree(name, host[name], arrays) for name in ("params", "opt_state")}
    trees["ema"] = None if host["ema"] is None else _pack_tree("ema", host["ema"], arrays)
    trees["key"] = _pack_tree("key", key, arrays)
    meta = {"format": FORMAT_VERSION, "step": int(host["step"]), "n_bad": int(host["n_bad"]),
            "bad_run": int(host["bad_run"]), "config": config, "versions": _versions(),
            "history": history, "trees": trees}
    arrays[_META] = np.array(json.dumps(meta))
    atomic_savez(path, **arrays)


# ------------------------------------------------------------------------------------- checkpoint
def load_checkpoint(path, *, params_like=None) -> dict:
    """Read a checkpoint written by :func:`fit`.

    Args:
        path: the checkpoint folder (``checkpoint_dir`` of :func:`fit`) or the ``.npz`` file.
        params_like: optional pytree with the structure of the parameters (arrays or
            ``jax.ShapeDtypeStruct``, e.g. the state of ``nnx.eval_shape``/``nnx.split``); if given,
            ``params`` and ``ema`` come back in that structure (checked leaf by leaf).

    Returns:
        A dict with ``params``, ``opt_state``, ``ema`` (None if not kept) — NumPy leaves in nested
        dicts keyed by their pytree path entries (dict keys, attribute names, indices), unless
        ``params_like`` is given —, ``key``, ``step``, ``n_bad``, ``history`` (a :class:`History`),
        ``config`` and ``versions``.

    Raises:
        FileNotFoundError: no checkpoint there.
        ValueError: unknown format, or the checkpoint does not match ``params_like``.
    """
    meta, arrays = _read_checkpoint(path)
    out = {}
    for name in ("params", "opt_state", "ema", "key"):
        entries = meta["trees"][name]
        if entries is None:
            out[name] = None
            continue
        leaves = _unpack_leaves(name, entries, arrays)
        if params_like is not None and name in ("params", "ema"):
            out[name] = _unflatten_like(name, entries, leaves, params_like, _checkpoint_file(path))
        else:
            out[name] = _nested(entries, leaves)
    out.update(step=meta["step"], n_bad=meta["n_bad"], history=History(meta["history"]),
               config=meta["config"], versions=meta["versions"])
    return out


# -------------------------------------------------------------------------------------- the step
def _make_step(loss_fn, tx, *, has_aux, ema_decay, batch_size, n_examples, aux_names,
               batch_sharding, out_sharding):
    """The jitted train step ``(carry, data, key, frozen) -> carry``; the carry (arg 0) is donated.
    ``loss_fn(params, batch, key, frozen)``."""

    def step_fn(carry, data, key, frozen):
        params, step = carry["params"], carry["step"]
        k_batch, k_loss = jax.random.split(jax.random.fold_in(key, step))
        idx = jax.random.randint(k_batch, (batch_size,), 0, n_examples)
        if batch_sharding is not None:
            idx = jax.lax.with_sharding_constraint(idx, batch_sharding)
        batch = jax.tree.map(lambda a: jnp.take(a, idx, axis=0), data)
        if batch_sharding is not None:
            batch = jax.lax.with_sharding_constraint(batch, batch_sharding)

        def objective(trainable):
            out = loss_fn(_merge(trainable, params), batch, k_loss, frozen)
            return out if has_aux else (out, {})

        trainable = _trainable(params)
        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, carry["opt_state"], trainable)
        new_params = _merge(optax.apply_updates(trainable, updates), params)
        new = dict(carry)
        new["params"] = _select(ok, new_params, params)
        new["opt_state"] = _select(ok, new_opt, carry["opt_state"])
        if ema_decay is not None:
            t = step.astype(jnp.float32)
            d = jnp.minimum(ema_decay, (1.0 + t) / (10.0 + t))
            ema = jax.tree.map(lambda e, p: (d * e + (1 - d) * p).astype(e.dtype)
                               if _is_trainable(e) else p, carry["ema"], new_params)
            new["ema"] = _select(ok, ema, carry["ema"])
        new["step"] = step + 1
        new["n_bad"] = carry["n_bad"] + (~ok).astype(jnp.int32)
        new["bad_run"] = jnp.where(ok, 0, carry["bad_run"] + 1)
        win = carry["win"]
        new["win"] = {
            "n": win["n"] + ok.astype(jnp.int32),
            "worst": jnp.maximum(win["worst"], new["bad_run"]),
            "loss": win["loss"] + jnp.where(ok, loss, 0.0).astype(jnp.float32),
            "grad_norm": win["grad_norm"] + jnp.where(ok, grad_norm, 0.0).astype(jnp.float32),
            "aux": {k: win["aux"][k] + jnp.where(ok, jnp.mean(aux[k]), 0.0).astype(jnp.float32)
                    for k in aux_names},
        }
        return new

    extra = {} if out_sharding is None else {"out_shardings": out_sharding}
    return jax.jit(step_fn, donate_argnums=0, **extra)


def _zero_window(aux_names) -> dict:
    z = np.zeros((), np.float32)
    return {"n": np.zeros((), np.int32), "worst": np.zeros((), np.int32), "loss": z,
            "grad_norm": z, "aux": {k: z for k in aux_names}}


# --------------------------------------------------------------------------------------- the loop
def fit(key, loss_fn: Callable, params, data, *, steps: int, batch_size: int,
        optimizer: optax.GradientTransformation | None = None, learning_rate: float = 1e-3,
        warmup_steps: int = 0, clip_norm: float | None = 1.0, ema_decay: float | None = None,
        checkpoint_dir=None, checkpoint_every: int = 1000, resume: bool = True,
        log_every: int = 10, progress: bool = True, devices=None, max_bad_steps: int = 100,
        has_aux: bool = False, frozen=None) -> tuple[TrainState, History]:
    """Minimise ``loss_fn`` over ``params`` by stochastic gradient steps on random batches of ``data``.

    Step s (0-based) draws ``batch_size`` indices uniformly *with replacement* from [0, N) and the
    loss key with ``jax.random.fold_in(key, s)``, so the run is a function of ``key`` and the step
    number alone; resuming from a checkpoint gives bitwise the parameters of an uninterrupted run on
    the same devices.

    Args:
        key: PRNG key (``jax.random.key`` or a raw ``PRNGKey``).
        loss_fn: pure ``loss_fn(params, batch, key) -> loss`` (a scalar); with ``has_aux=True``
            ``-> (loss, aux)`` where ``aux`` is a dict of scalars (averaged into the history).
            ``batch`` has the structure of ``data`` with leading axis B.
        params: pytree of arrays. Floating leaves are trained; other leaves (ints, bools, PRNG keys,
            e.g. in an ``nnx.split`` state) are passed through unchanged. Not modified (copied
            before donation).
        data: pytree of arrays with a shared leading example axis N, e.g. (N, V, C) or a dict of
            such arrays. Kept on the device(s) (replicated over several devices); batches are
            gathered inside the jitted step.
        steps: total optimizer steps (a resumed run continues up to this number).
        batch_size: examples per step B (1 ≤ B ≤ N; a multiple of the number of devices).
        optimizer: any optax ``GradientTransformation``; default Adam at ``learning_rate`` with a
            linear warm-up over ``warmup_steps`` (lr_k = learning_rate · min(1, (k+1)/warmup)).
        learning_rate: peak learning rate of the default optimizer.
        warmup_steps: warm-up length of the default optimizer (0: constant learning rate).
        clip_norm: if not None, gradients are clipped to this global norm before the optimizer
            (``optax.clip_by_global_norm``, also around a given ``optimizer``).
        ema_decay: if not None, keep an EMA of the parameters in ``state.ema``. Its decay is warmed
            up: at step s (0-based) ``d_s = min(ema_decay, (1 + s) / (10 + s))`` and
            ``ema ← d_s · ema + (1 − d_s) · params`` (the TensorFlow ``num_updates`` rule, so short
            runs do not stay near the initialisation). Starts at ``params``; skipped steps leave it.
        checkpoint_dir: folder for ``checkpoint.npz``, written atomically every ``checkpoint_every``
            steps and at the end (None: no checkpoints).
        checkpoint_every: steps between checkpoints.
        resume: continue from the checkpoint in ``checkpoint_dir`` if there is one (its key,
            parameters, optimizer state, EMA, step and history are used).
        log_every: steps between history entries (each one waits for the device; it is also when
            the NaN guard's ``max_bad_steps`` is checked).
        progress: show a tqdm progress bar with the running loss.
        devices: devices for data parallelism (default ``jax.local_devices()``). With D > 1, params
            and optimizer state are replicated and the batch is sharded along B over a 1-D mesh
            ``('data',)``.
        max_bad_steps: raise after this many consecutive steps with a non-finite loss or gradient
            norm (such steps are skipped: params, optimizer state and EMA stay unchanged).
        has_aux: ``loss_fn`` returns ``(loss, aux)``.
        frozen: optional pytree of arrays that the loss needs but that are not trained (geometry,
            a fixed prior's weights, …). It is then passed as a fourth argument,
            ``loss_fn(params, batch, key, frozen)``: placed on the device(s) once, not donated,
            not differentiated, not checkpointed (pass the same one when resuming). Passing large
            arrays this way instead of closing over them keeps them out of the compiled program.

    Returns:
        ``(state, history)``: the final :class:`TrainState` (params on the device(s)) and the
        :class:`History`.

    Raises:
        ValueError: bad arguments, a non-scalar loss, or a checkpoint that does not match ``params``
            (or is past ``steps``).
        FloatingPointError: ``max_bad_steps`` consecutive non-finite steps.
    """
    # --- arguments
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer ≥ 1, got {steps!r}")
    n_examples = _n_examples(data)
    if not isinstance(batch_size, (int, np.integer)) or not 1 <= batch_size <= n_examples:
        raise ValueError(f"batch_size must be an integer in [1, N = {n_examples}], got {batch_size!r}")
    if optimizer is None:
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
        if not isinstance(warmup_steps, (int, np.integer)) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer ≥ 0, got {warmup_steps!r}")
    elif not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise ValueError(f"optimizer must be an optax GradientTransformation, got {type(optimizer)}")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm!r}")
    if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1) or None, got {ema_decay!r}")
    for name, v in (("checkpoint_every", checkpoint_every), ("log_every", log_every),
                    ("max_bad_steps", max_bad_steps)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be an integer ≥ 1, got {v!r}")
    if not jax.tree.leaves(_trainable(params)):
        raise ValueError("params has no floating-point leaves to train")
    devices = list(jax.local_devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices must name at least one device")
    n_dev = len(devices)
    if batch_size % n_dev:
        raise ValueError(f"batch_size = {batch_size} must be divisible by the number of devices "
                         f"({n_dev}); pass devices=... to use fewer")

    tx = _default_optimizer(learning_rate, warmup_steps) if optimizer is None else optimizer
    if clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)

    # --- placement: one device plainly, several through a 1-D mesh
    if n_dev > 1:
        mesh = jax.sharding.Mesh(np.array(devices), ("data",))
        where = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    else:
        where, batch_sharding = jax.sharding.SingleDeviceSharding(devices[0]), None
    out_sharding = where if n_dev > 1 else None
    if frozen is not None:
        user_loss, frozen_dev = loss_fn, jax.device_put(frozen, where)
    else:
        user_loss, frozen_dev = (lambda p, b, k, f: loss_fn(p, b, k)), None
    # A private copy for every donated tree: device_put may hand back the caller's buffer (even with
    # may_alias=False when replicating onto a mesh), which donation would then delete.
    copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=where)

    def put(tree):
        return copy(jax.device_put(tree, where))

    data_dev = jax.device_put(data, where)
    params_dev = put(params)

    # --- the loss's auxiliary outputs (and an early, clear error on a bad loss)
    idx0 = np.zeros((batch_size,), np.int32)
    batch0 = jax.eval_shape(lambda d: jax.tree.map(lambda a: a[idx0], d), data_dev)
    try:
        out = jax.eval_shape(user_loss, params_dev, batch0, jax.random.fold_in(key, 0), frozen_dev)
    except Exception as e:
        e.add_note(f"(in geodiff.train.fit: loss_fn(params, batch, key) traced on a batch of shape "
                   f"{jax.tree.map(lambda a: a.shape, batch0)})")
        raise
    if has_aux:
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
            raise ValueError("with has_aux=True, loss_fn must return (loss, aux_dict)")
        loss_shape, aux_names = out[0], sorted(out[1])
        clash = set(aux_names) & {*_HISTORY_LISTS, "n_bad", "compile_s", "step_s"}
        if clash:
            raise ValueError(f"aux names {sorted(clash)} clash with history entries")
    else:
        if isinstance(out, tuple):
            raise ValueError("loss_fn returned a tuple; pass has_aux=True if it returns (loss, aux)")
        loss_shape, aux_names = out, []
    if getattr(loss_shape, "shape", None) != ():
        raise ValueError("loss_fn must return a scalar loss, got shape "
                         f"{getattr(loss_shape, 'shape', None)}")

    config = {
        "steps": int(steps), "batch_size": int(batch_size),
        "optimizer": "adam" if optimizer is None else f"custom ({type(optimizer).__name__})",
        "learning_rate": float(learning_rate) if optimizer is None else None,
        "warmup_steps": int(warmup_steps) if optimizer is None else None,
        "clip_norm": None if clip_norm is None else float(clip_norm),
        "ema_decay": None if ema_decay is None else float(ema_decay),
        "max_bad_steps": int(max_bad_steps), "has_aux": bool(has_aux), "n_devices": n_dev,
        "data": [list(jnp.shape(a)) for a in jax.tree.leaves(data)],
        "loss_fn": getattr(loss_fn, "__qualname__", type(loss_fn).__name__),
    }

    # --- initial state, or the checkpoint's
    carry = {"params": params_dev, "opt_state": put(tx.init(_trainable(params_dev))),
             "ema": put(params) if ema_decay is not None else None,
             "step": np.int32(0), "n_bad": np.int32(0), "bad_run": np.int32(0)}
    history = History(step=[], loss=[], grad_norm=[], time=[], **{k: [] for k in aux_names})
    previous = {}        # timings of the call that wrote the checkpoint we resume from
    ckpt = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_NAME
    if resume and ckpt is not None and ckpt.exists():
        meta, arrays = _read_checkpoint(ckpt)
        if meta["step"] > steps:
            raise ValueError(f"checkpoint {ckpt} is at step {meta['step']}, past steps = {steps}; "
                             "raise steps, or use resume=False / another checkpoint_dir")
        changed = [k for k in _RESUME_CHECKED if meta["config"].get(k) != config[k]]
        if changed:
            warnings.warn(f"resuming from {ckpt} with different {', '.join(changed)} "
                          f"(was {[meta['config'].get(k) for k in changed]}, now "
                          f"{[config[k] for k in changed]})", stacklevel=2)
        for name in ("params", "opt_state"):
            leaves = _unpack_leaves(name, meta["trees"][name], arrays)
            carry[name] = put(_unflatten_like(name, meta["trees"][name], leaves, carry[name], ckpt))
        if ema_decay is not None:
            if meta["trees"]["ema"] is None:
                carry["ema"] = put(carry["params"])
            else:
                leaves = _unpack_leaves("ema", meta["trees"]["ema"], arrays)
                carry["ema"] = put(_unflatten_like("ema", meta["trees"]["ema"], leaves,
                                                   carry["params"], ckpt))
        saved_key = _unpack_leaves("key", meta["trees"]["key"], arrays)[0]
        if not np.array_equal(_to_numpy(saved_key), _to_numpy(key)):
            warnings.warn(f"resuming from {ckpt}: using the checkpoint's key, not the one given",
                          stacklevel=2)
        key = saved_key
        carry.update(step=np.int32(meta["step"]), n_bad=np.int32(meta["n_bad"]),
                     bad_run=np.int32(meta["bad_run"]))
        for k, v in meta["history"].items():
            if isinstance(v, list):
                history[k] = list(v)
            elif k in ("compile_s", "step_s"):
                previous[k] = v
    start = int(carry["step"])
    for k in ("step", "n_bad", "bad_run"):
        carry[k] = jax.device_put(carry[k], where)
    carry["win"] = jax.device_put(_zero_window(aux_names), where)
    key_dev = jax.device_put(key, where)

    step_fn = _make_step(user_loss, tx, has_aux=has_aux, ema_decay=ema_decay, batch_size=batch_size,
                         n_examples=n_examples, aux_names=aux_names,
                         batch_sharding=batch_sharding, out_sharding=out_sharding)

    # --- the loop
    from tqdm.auto import tqdm

    time0 = history["time"][-1] if history["time"] else 0.0
    t_start = time.perf_counter()
    compile_s, step_times = None, []

    def timings():
        return {"compile_s": compile_s if compile_s is not None else previous.get("compile_s"),
                "step_s": (statistics.median(step_times) if step_times
                           else previous.get("step_s", math.nan))}
    n_bad = int(carry["n_bad"])
    bar = tqdm(total=steps, initial=start, disable=not progress, desc="fit", unit="step",
               dynamic_ncols=True)
    try:
        t_mark, n_since, last_bar = t_start, 0, start
        for s in range(start + 1, steps + 1):
            carry = step_fn(carry, data_dev, key_dev, frozen_dev)
            if s == start + 1:
                jax.block_until_ready(carry)
                compile_s = time.perf_counter() - t_start
                t_mark, n_since = time.perf_counter(), 0
            else:
                n_since += 1
            save = ckpt is not None and (s % checkpoint_every == 0 or s == steps)
            if not (save or s % log_every == 0 or s == steps):
                continue
            win = jax.device_get(carry["win"])  # waits for the device
            now = time.perf_counter()
            if n_since:
                step_times.append((now - t_mark) / n_since)
            n_ok = int(win["n"])
            mean = (lambda v: float(v) / n_ok) if n_ok else (lambda v: math.nan)
            history["step"].append(s)
            history["loss"].append(mean(win["loss"]))
            history["grad_norm"].append(mean(win["grad_norm"]))
            history["time"].append(time0 + now - t_start)
            for k in aux_names:
                history[k].append(mean(win["aux"][k]))
            n_bad = int(jax.device_get(carry["n_bad"]))
            history["n_bad"] = n_bad
            carry["win"] = jax.device_put(_zero_window(aux_names), where)
            bar.update(s - last_bar)
            last_bar = s
            bar.set_postfix(loss=f"{history['loss'][-1]:.4g}", bad=n_bad, refresh=False)
            too_bad = int(win["worst"]) >= max_bad_steps
            if save or too_bad:
                history.update(n_bad=n_bad, **timings())
                if ckpt is not None:
                    _write_checkpoint(ckpt, carry, key, history, config)
            if too_bad:
                raise FloatingPointError(
                    f"{int(win['worst'])} consecutive steps (≥ max_bad_steps = {max_bad_steps}) had a "
                    f"non-finite loss or gradient norm, by step {s} ({n_bad} skipped in all); their "
                    "updates were skipped, parameters are the last finite ones"
                    + (f" (checkpoint in {ckpt.parent})" if ckpt is not None else "")
                    + ". Lower the learning rate, check the data for NaN/inf, or check loss_fn.")
            t_mark, n_since = time.perf_counter(), 0
    finally:
        bar.close()

    history.update(n_bad=n_bad, **timings())
    state = TrainState(params=carry["params"], opt_state=carry["opt_state"],
                       step=int(jax.device_get(carry["step"])), ema=carry["ema"], n_bad=n_bad,
                       key=key)
    return state, history
