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

from geodiff._cache import atomic_savez, read_npz

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
    meta, arrays = read_npz(path, _META, "geodiff training checkpoint")
    if "trees" not in meta or "step" not in meta:
        raise ValueError(f"path: {str(path)!r} is not a geodiff training checkpoint")
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


def _resume(ckpt: Path, carry: dict, key, *, steps: int, config: dict, ema_decay, place: _Placement
            ) -> tuple[dict, Any, dict]:
    """Continue from the checkpoint file ``ckpt``: its parameters, optimizer state, EMA, key, step.

    Args:
        ckpt: the ``checkpoint.npz`` file (it exists).
        carry: the fresh carry of :func:`_initial_carry`; its trees give the structure the file is
            checked against (leaf by leaf).
        key: the key given to :func:`fit` (a warning if the checkpoint's differs; the checkpoint's
            is used).
        steps: that of this call (an error if the checkpoint is past it).
        config: that of this call (a warning for each :data:`_RESUME_CHECKED` entry that differs
            from the saved one).
        ema_decay: that of this call; a checkpoint without EMA starts it at its parameters.
        place: where the loaded trees go (as private copies: they are donated).

    Returns:
        ``(carry, key, saved_history)``: a new carry (host scalars ``step``, ``n_bad``,
        ``bad_run``), the checkpoint's key and the history it recorded (a plain dict).

    Warnings are issued at the caller of :func:`fit` (``stacklevel=3``).
    """
    meta, arrays = _read_checkpoint(ckpt)
    if meta["step"] > steps:
        raise ValueError(f"checkpoint {ckpt} is at step {meta['step']}, past steps = {steps}; "
                         "raise steps, or use resume=False / another checkpoint_dir")
    changed = [k for k in _RESUME_CHECKED if meta["config"].get(k) != config[k]]
    if changed:
        warnings.warn(f"resuming from {ckpt} with different {', '.join(changed)} "
                      f"(was {[meta['config'].get(k) for k in changed]}, now "
                      f"{[config[k] for k in changed]})", stacklevel=3)
    carry = dict(carry)
    for name in ("params", "opt_state"):
        leaves = _unpack_leaves(name, meta["trees"][name], arrays)
        carry[name] = place.copy(_unflatten_like(name, meta["trees"][name], leaves, carry[name],
                                                 ckpt))
    if ema_decay is not None:
        if meta["trees"]["ema"] is None:
            carry["ema"] = place.copy(carry["params"])
        else:
            leaves = _unpack_leaves("ema", meta["trees"]["ema"], arrays)
            carry["ema"] = place.copy(_unflatten_like("ema", meta["trees"]["ema"], leaves,
                                                      carry["params"], ckpt))
    saved_key = _unpack_leaves("key", meta["trees"]["key"], arrays)[0]
    if not np.array_equal(_to_numpy(saved_key), _to_numpy(key)):
        warnings.warn(f"resuming from {ckpt}: using the checkpoint's key, not the one given",
                      stacklevel=3)
    carry.update(step=np.int32(meta["step"]), n_bad=np.int32(meta["n_bad"]),
                 bad_run=np.int32(meta["bad_run"]))
    return carry, saved_key, meta["history"]


# -------------------------------------------------------------------------------------- arguments
def _check_arguments(params, data, *, steps, batch_size, optimizer, learning_rate, warmup_steps,
                     clip_norm, ema_decay, checkpoint_every, log_every, max_bad_steps, devices
                     ) -> tuple[int, list]:
    """Check :func:`fit`'s arguments (ValueError on the first bad one, in signature order).

    Returns:
        ``(N, devices)``: the number of examples in ``data`` and the device list (default
        ``jax.local_devices()``), D ≥ 1 of them with ``batch_size`` divisible by D.
    """
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
    if batch_size % len(devices):
        raise ValueError(f"batch_size = {batch_size} must be divisible by the number of devices "
                         f"({len(devices)}); pass devices=... to use fewer")
    return n_examples, devices


def _transform(optimizer, learning_rate, warmup_steps, clip_norm) -> optax.GradientTransformation:
    """The update rule: ``optimizer`` (default :func:`_default_optimizer`), after gradient clipping
    to the global norm ``clip_norm`` unless it is None."""
    tx = _default_optimizer(learning_rate, warmup_steps) if optimizer is None else optimizer
    if clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
    return tx


def _aux_names(loss_fn, params, data, key, frozen, *, batch_size: int, has_aux: bool) -> list[str]:
    """The sorted names of the loss's auxiliary outputs ([] without ``has_aux``).

    Traces ``loss_fn(params, batch, fold_in(key, 0), frozen)`` abstractly (``jax.eval_shape``, no
    computation, no key consumed) on a batch of B examples of ``data``, for an early, clear error
    on a loss that fails, returns the wrong kind of value, or is not a scalar.
    """
    idx0 = np.zeros((batch_size,), np.int32)
    batch0 = jax.eval_shape(lambda d: jax.tree.map(lambda a: a[idx0], d), data)
    try:
        out = jax.eval_shape(loss_fn, params, batch0, jax.random.fold_in(key, 0), frozen)
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
            raise ValueError("loss_fn returned a tuple; pass has_aux=True if it returns "
                             "(loss, aux)")
        loss_shape, aux_names = out, []
    if getattr(loss_shape, "shape", None) != ():
        raise ValueError("loss_fn must return a scalar loss, got shape "
                         f"{getattr(loss_shape, 'shape', None)}")
    return aux_names


def _config(loss_fn, data, *, steps, batch_size, optimizer, learning_rate, warmup_steps, clip_norm,
            ema_decay, max_bad_steps, has_aux, n_devices) -> dict:
    """The fit arguments that matter, as saved in a checkpoint's ``config`` (JSON)."""
    return {
        "steps": int(steps), "batch_size": int(batch_size),
        "optimizer": "adam" if optimizer is None else f"custom ({type(optimizer).__name__})",
        "learning_rate": float(learning_rate) if optimizer is None else None,
        "warmup_steps": int(warmup_steps) if optimizer is None else None,
        "clip_norm": None if clip_norm is None else float(clip_norm),
        "ema_decay": None if ema_decay is None else float(ema_decay),
        "max_bad_steps": int(max_bad_steps), "has_aux": bool(has_aux), "n_devices": n_devices,
        "data": [list(jnp.shape(a)) for a in jax.tree.leaves(data)],
        "loss_fn": getattr(loss_fn, "__qualname__", type(loss_fn).__name__),
    }


# -------------------------------------------------------------------------------------- placement
class _Placement:
    """Where :func:`fit` keeps its arrays: one device plainly, D > 1 devices through a 1-D mesh.

    Attributes:
        where: the sharding of everything but the batch: the device, or replicated over the mesh
            ``('data',)``.
        batch_sharding: the batch's sharding along its leading axis B over the mesh (None on one
            device).
        out_sharding: the step's output sharding (``where`` over a mesh, None on one device).
    """

    def __init__(self, devices: list):
        if len(devices) > 1:
            mesh = jax.sharding.Mesh(np.array(devices), ("data",))
            spec = jax.sharding.PartitionSpec
            self.where = jax.sharding.NamedSharding(mesh, spec())
            self.batch_sharding = jax.sharding.NamedSharding(mesh, spec("data"))
        else:
            self.where, self.batch_sharding = jax.sharding.SingleDeviceSharding(devices[0]), None
        self.out_sharding = self.where if len(devices) > 1 else None
        self._copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=self.where)

    def put(self, tree):
        """``tree`` at ``where``; may share the caller's buffers, so never for a donated tree."""
        return jax.device_put(tree, self.where)

    def copy(self, tree):
        """A private copy of ``tree`` at ``where``, for every donated tree: ``device_put`` may hand
        back the caller's buffer (even with may_alias=False when replicating onto a mesh), which
        donation would then delete."""
        return self._copy(jax.device_put(tree, self.where))


def _initial_carry(params, params_dev, tx, ema_decay, place: _Placement) -> dict:
    """The state at step 0: ``params``, ``opt_state``, ``ema`` (None without ``ema_decay``) on the
    device(s), and host int32 scalars ``step``, ``n_bad``, ``bad_run`` (all 0)."""
    return {"params": params_dev, "opt_state": place.copy(tx.init(_trainable(params_dev))),
            "ema": place.copy(params) if ema_decay is not None else None,
            "step": np.int32(0), "n_bad": np.int32(0), "bad_run": np.int32(0)}


def _carry_to_device(carry: dict, aux_names, place: _Placement) -> dict:
    """``carry`` with its scalars on the device(s) and an empty window ``win`` added: the step's
    input (see :func:`_make_step`)."""
    carry = dict(carry)
    for k in ("step", "n_bad", "bad_run"):
        carry[k] = place.put(carry[k])
    carry["win"] = place.put(_zero_window(aux_names))
    return carry


# -------------------------------------------------------------------------------------- the step
def _draw_batch(data, key, step, *, batch_size, n_examples, batch_sharding):
    """The batch of step ``step`` and its loss key, both functions of ``(key, step)`` alone.

    ``batch_size`` indices drawn uniformly with replacement from [0, N) with the first half of
    ``split(fold_in(key, step))``; returns ``(batch, k_loss)``, ``batch`` with the structure of
    ``data`` and leading axis B (sharded along B by ``batch_sharding`` unless it is None).
    """
    k_batch, k_loss = jax.random.split(jax.random.fold_in(key, step))
    idx = jax.random.randint(k_batch, (batch_size,), 0, n_examples)
    if batch_sharding is not None:
        idx = jax.lax.with_sharding_constraint(idx, batch_sharding)
    batch = jax.tree.map(lambda a: jnp.take(a, idx, axis=0), data)
    if batch_sharding is not None:
        batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    return batch, k_loss


def _ema_update(ema, params, step, ema_decay: float):
    """``d · ema + (1 − d) · params`` on trainable leaves (others take ``params``'), with the
    warmed-up decay ``d = min(ema_decay, (1 + step) / (10 + step))`` (``step`` 0-based)."""
    t = step.astype(jnp.float32)
    d = jnp.minimum(ema_decay, (1.0 + t) / (10.0 + t))
    return jax.tree.map(lambda e, p: (d * e + (1 - d) * p).astype(e.dtype)
                        if _is_trainable(e) else p, ema, params)


def _window_update(win, ok, loss, grad_norm, aux, bad_run, aux_names) -> dict:
    """Add one step to the logging window (see :func:`_zero_window`): the sums of the finite steps'
    loss, gradient norm and aux means (float32), their count ``n``, and ``worst``, the longest run
    of consecutive skipped steps seen (``bad_run`` after this step)."""
    return {
        "n": win["n"] + ok.astype(jnp.int32),
        "worst": jnp.maximum(win["worst"], bad_run),
        "loss": win["loss"] + jnp.where(ok, loss, 0.0).astype(jnp.float32),
        "grad_norm": win["grad_norm"] + jnp.where(ok, grad_norm, 0.0).astype(jnp.float32),
        "aux": {k: win["aux"][k] + jnp.where(ok, jnp.mean(aux[k]), 0.0).astype(jnp.float32)
                for k in aux_names},
    }


def _make_step(loss_fn, tx, *, has_aux, ema_decay, batch_size, n_examples, aux_names,
               batch_sharding, out_sharding):
    """The jitted train step ``(carry, data, key, frozen) -> carry``; the carry (arg 0) is donated.

    ``loss_fn(params, batch, key, frozen)``. The carry holds ``params``, ``opt_state``, ``ema``
    (or None), the int32 scalars ``step`` (steps taken), ``n_bad`` (skipped steps),
    ``bad_run`` (current run of consecutive skipped steps) and the logging window ``win``. One step:
    draw the batch (:func:`_draw_batch`), loss and gradient of the trainable leaves, the update
    ``tx`` (gradient clipping included), the NaN guard (keep the old params, optimizer state and
    EMA unless the loss and the global gradient norm are finite), the EMA (:func:`_ema_update`) and
    the window (:func:`_window_update`).
    """

    def step_fn(carry, data, key, frozen):
        params, step = carry["params"], carry["step"]
        batch, k_loss = _draw_batch(data, key, step, batch_size=batch_size, n_examples=n_examples,
                                    batch_sharding=batch_sharding)

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
            new["ema"] = _select(ok, _ema_update(carry["ema"], new_params, step, ema_decay),
                                 carry["ema"])
        new["step"] = step + 1
        new["n_bad"] = carry["n_bad"] + (~ok).astype(jnp.int32)
        new["bad_run"] = jnp.where(ok, 0, carry["bad_run"] + 1)
        new["win"] = _window_update(carry["win"], ok, loss, grad_norm, aux, new["bad_run"],
                                    aux_names)
        return new

    extra = {} if out_sharding is None else {"out_shardings": out_sharding}
    return jax.jit(step_fn, donate_argnums=0, **extra)


def _zero_window(aux_names) -> dict:
    """An empty logging window (host scalars): ``n``, ``worst`` (int32) and the float32 sums
    ``loss``, ``grad_norm``, ``aux[name]``."""
    z = np.zeros((), np.float32)
    return {"n": np.zeros((), np.int32), "worst": np.zeros((), np.int32), "loss": z,
            "grad_norm": z, "aux": {k: z for k in aux_names}}


def _too_many_bad_steps(worst: int, max_bad_steps: int, step: int, n_bad: int, ckpt
                        ) -> FloatingPointError:
    """The error raised when ``worst`` ≥ ``max_bad_steps`` consecutive steps were skipped."""
    return FloatingPointError(
        f"{worst} consecutive steps (≥ max_bad_steps = {max_bad_steps}) had a "
        f"non-finite loss or gradient norm, by step {step} ({n_bad} skipped in all); their "
        "updates were skipped, parameters are the last finite ones"
        + (f" (checkpoint in {ckpt.parent})" if ckpt is not None else "")
        + ". Lower the learning rate, check the data for NaN/inf, or check loss_fn.")


# ---------------------------------------------------------------------------------------- history
class _Recorder:
    """The :class:`History` of a fit call and its clock (wall seconds, ``time.perf_counter``).

    Attributes:
        history: the :class:`History` (the saved lists of a resumed run, continued).
        previous: ``compile_s`` / ``step_s`` of the call that wrote the checkpoint resumed from
            (used when this call runs fewer than two steps).
    """

    def __init__(self, aux_names, saved: dict | None = None):
        """``saved``: the history recorded in the checkpoint resumed from (None: a fresh run)."""
        self.aux_names = aux_names
        self.history = History(step=[], loss=[], grad_norm=[], time=[],
                               **{k: [] for k in aux_names})
        self.previous = {}
        for k, v in (saved or {}).items():
            if isinstance(v, list):
                self.history[k] = list(v)
            elif k in ("compile_s", "step_s"):
                self.previous[k] = v

    def start(self) -> None:
        """Start the clock (``time`` goes on from the last saved entry, 0 for a fresh run)."""
        self.time0 = self.history["time"][-1] if self.history["time"] else 0.0
        self.t_start = time.perf_counter()
        self.compile_s, self.step_times = None, []
        self.t_mark, self.n_since = self.t_start, 0

    def stepped(self, carry, *, first: bool) -> None:
        """After a step was dispatched; the first one is waited for and timed as ``compile_s``."""
        if first:
            jax.block_until_ready(carry)
            self.compile_s = time.perf_counter() - self.t_start
            self.t_mark, self.n_since = time.perf_counter(), 0
        else:
            self.n_since += 1

    def record(self, step: int, win: dict, n_bad) -> int:
        """Append the entry of ``step`` from the window ``win`` (on the host): means over its
        ``win['n']`` finite steps (NaN if none), the time, and the per-step time of the steps since
        the last mark. Fetches ``n_bad`` (the device's count of skipped steps) and returns it."""
        now = time.perf_counter()
        if self.n_since:
            self.step_times.append((now - self.t_mark) / self.n_since)
        n_ok = int(win["n"])
        mean = (lambda v: float(v) / n_ok) if n_ok else (lambda v: math.nan)
        history = self.history
        history["step"].append(step)
        history["loss"].append(mean(win["loss"]))
        history["grad_norm"].append(mean(win["grad_norm"]))
        history["time"].append(self.time0 + now - self.t_start)
        for k in self.aux_names:
            history[k].append(mean(win["aux"][k]))
        n_bad = int(jax.device_get(n_bad))
        history["n_bad"] = n_bad
        return n_bad

    def restart(self) -> None:
        """Mark the time after an entry (and a checkpoint write): step times start again here."""
        self.t_mark, self.n_since = time.perf_counter(), 0

    def timings(self) -> dict:
        """``compile_s`` and ``step_s`` (median seconds per step) of this call, or the previous
        call's where this one has none."""
        return {"compile_s": self.compile_s if self.compile_s is not None
                else self.previous.get("compile_s"),
                "step_s": (statistics.median(self.step_times) if self.step_times
                           else self.previous.get("step_s", math.nan))}

    def stamp(self, n_bad: int) -> History:
        """Set the scalars ``n_bad``, ``compile_s``, ``step_s`` (before a checkpoint; at the end)
        and return the history."""
        self.history.update(n_bad=n_bad, **self.timings())
        return self.history


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
    n_examples, devices = _check_arguments(
        params, data, steps=steps, batch_size=batch_size, optimizer=optimizer,
        learning_rate=learning_rate, warmup_steps=warmup_steps, clip_norm=clip_norm,
        ema_decay=ema_decay, checkpoint_every=checkpoint_every, log_every=log_every,
        max_bad_steps=max_bad_steps, devices=devices)
    tx = _transform(optimizer, learning_rate, warmup_steps, clip_norm)

    # --- placement: data and frozen arrays shared, donated trees copied
    place = _Placement(devices)
    if frozen is not None:
        user_loss, frozen_dev = loss_fn, place.put(frozen)
    else:
        user_loss, frozen_dev = (lambda p, b, k, f: loss_fn(p, b, k)), None
    data_dev = place.put(data)
    params_dev = place.copy(params)
    aux_names = _aux_names(user_loss, params_dev, data_dev, key, frozen_dev, batch_size=batch_size,
                           has_aux=has_aux)
    config = _config(loss_fn, data, steps=steps, batch_size=batch_size, optimizer=optimizer,
                     learning_rate=learning_rate, warmup_steps=warmup_steps, clip_norm=clip_norm,
                     ema_decay=ema_decay, max_bad_steps=max_bad_steps, has_aux=has_aux,
                     n_devices=len(devices))

    # --- initial state, or the checkpoint's
    carry, saved = _initial_carry(params, params_dev, tx, ema_decay, place), None
    ckpt = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_NAME
    if resume and ckpt is not None and ckpt.exists():
        carry, key, saved = _resume(ckpt, carry, key, steps=steps, config=config,
                                    ema_decay=ema_decay, place=place)
    rec = _Recorder(aux_names, saved)
    start = int(carry["step"])
    carry = _carry_to_device(carry, aux_names, place)
    key_dev = place.put(key)

    step_fn = _make_step(user_loss, tx, has_aux=has_aux, ema_decay=ema_decay, batch_size=batch_size,
                         n_examples=n_examples, aux_names=aux_names,
                         batch_sharding=place.batch_sharding, out_sharding=place.out_sharding)

    # --- the loop
    from tqdm.auto import tqdm

    rec.start()
    n_bad = int(carry["n_bad"])
    bar = tqdm(total=steps, initial=start, disable=not progress, desc="fit", unit="step",
               dynamic_ncols=True)
    try:
        last_bar = start
        for s in range(start + 1, steps + 1):
            carry = step_fn(carry, data_dev, key_dev, frozen_dev)
            rec.stepped(carry, first=s == start + 1)
            save = ckpt is not None and (s % checkpoint_every == 0 or s == steps)
            if not (save or s % log_every == 0 or s == steps):
                continue
            win = jax.device_get(carry["win"])  # waits for the device
            n_bad = rec.record(s, win, carry["n_bad"])
            carry["win"] = place.put(_zero_window(aux_names))
            bar.update(s - last_bar)
            last_bar = s
            bar.set_postfix(loss=f"{rec.history['loss'][-1]:.4g}", bad=n_bad, refresh=False)
            too_bad = int(win["worst"]) >= max_bad_steps
            if save or too_bad:
                rec.stamp(n_bad)
                if ckpt is not None:
                    _write_checkpoint(ckpt, carry, key, rec.history, config)
            if too_bad:
                raise _too_many_bad_steps(int(win["worst"]), max_bad_steps, s, n_bad, ckpt)
            rec.restart()
    finally:
        bar.close()

    history = rec.stamp(n_bad)
    state = TrainState(params=carry["params"], opt_state=carry["opt_state"],
                       step=int(jax.device_get(carry["step"])), ema=carry["ema"], n_bad=n_bad,
                       key=key)
    return state, history
