"""Shared pieces of the comparison benchmarks (era5_imputation, bunny_mnist_inpainting,
image_inverse, generalization): table rows in the schema of API.md, the baseline and APS runners,
resumable cached stages, Markdown tables and the common command line.

Conventions (every script):
- ``time_per_sample_s`` = wall time of one call / samples it produced, compile excluded; for APS
  the call is ``sampler.sample(key, one_measurement, n)`` with n = 1 or 128; for DPS/MCG one
  reverse chain on one measurement; for the closed-form baselines one call on the whole test batch
  divided by its size; for FlowPerY the per-measurement training plus 128 draws, divided by 128.
- ``APS(128)``, ``FlowPerY`` and the ``coverage90`` column score the mean / the spread of 128
  samples; APS(1), DPS and MCG score one sample per measurement.
- ``break_even_n`` = APS training seconds / (DPS seconds per measurement − APS(128) seconds per
  measurement): after that many measurements APS has cost less than DPS.
- On a sphere PSNR, MSE, coverage and CRPS are area-weighted (``mass``) and taken on the missing
  points only (:func:`scoring`); SSIM is the plain full-field SSIM. ``crps`` is the fair ensemble
  CRPS of the samples (APS: 128, the DPS ensemble: 8) and the closed-form Gaussian CRPS of the
  surrogate posterior for kriging.
- ``speedup`` (APS rows) = DPS seconds per sample / the row's seconds per sample: at 1 sample on
  the ``(1)`` rows, at 128 on the ``(128)`` rows. ``batch_per_field_s`` (``(128)`` rows) = the
  wall time of one compiled call that summarizes ``batch_fields`` (64) test measurements × 128
  samples (``iter_posterior``: mean, std, 5/50/95% quantiles) / ``batch_fields``;
  ``speedup_batch`` = 128 DPS samples' seconds / it. Both are measured after the cached stages
  (:func:`batch_timing`, every rerun measures them anew, on weights that do not change the cost;
  the mixture row times a stand-in mixture of the same shapes).
- APS rows: ``APS(n)`` is the paper's objective (measurements only) at τ = 1; ``APS[obj,τ](n)``
  the sampler trained with objective ``obj`` and calibrated (τ set on held-out training-split
  signals); the ``learned_from`` column says what each sampler learned from. ``APS[mixture,τ]``
  is the sampler whose base is the exact posterior of a Gaussian-mixture surrogate (EM on the
  same training-split signals; selection operators only), untrained and calibrated.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import jax
import numpy as np

from geodiff._cache import cache_dir
from geodiff.metrics import coverage, crps, crps_gaussian, mse, psnr, ssim
from geodiff.timing import machine_info, time_call, versions, write_json

ORDER = ("APS(1)", "APS(128)", "APS[reverse,τ](1)", "APS[reverse,τ](128)", "APS[pairs,τ](1)",
         "APS[pairs,τ](128)", "APS[pairs+reverse,τ](1)", "APS[pairs+reverse,τ](128)",
         "APS[mixture,τ](1)", "APS[mixture,τ](128)", "DPS",
         "DPS×8", "MCG", "Noise2Score", "FlowPerY", "Kriging", "Harmonic")
#: what each sampler learned from (the brief's labels), by objective
LEARNED_FROM = {"reverse": "measurements only (the paper's loss)",
                "pairs": "the prior's clean training set (simulated pairs)",
                "pairs+reverse": "the prior's clean training set, then measurements"}


# ------------------------------------------------------------------------------------ rows
def has_ssim(manifold) -> bool:
    """SSIM needs a 2-D layout (Grid, lat-lon Sphere); on meshes the tables report MSE only."""
    from geodiff import Grid, Sphere

    return isinstance(manifold, Grid) or (isinstance(manifold, Sphere) and manifold.kind == "latlon")


def scoring(manifold, measurement) -> dict:
    """Keyword arguments of the metrics for a task: on a :class:`~geodiff.Sphere`, area weights
    (``mass``) and the missing points of ``measurement`` (``where``); elsewhere every entry with
    equal weight ({})."""
    from geodiff import Sphere

    if not isinstance(manifold, Sphere):
        return {}
    return {"weights": np.asarray(manifold.mass), "where": ~np.asarray(measurement.mask)}


def _first(sc: dict, n: int) -> dict:
    """``scoring`` restricted to the first n signals."""
    return {k: (v[:n] if k == "where" else v) for k, v in sc.items()}


def score(task: str, method: str, est, truth, manifold, *, time_per_sample_s: float,
          scoring: dict | None = None, **extra) -> dict:
    """One table row (API.md schema): mean PSNR (data range 1), SSIM (``None`` on meshes) and MSE
    over the test measurements, with the metric keywords ``scoring`` (:func:`scoring`; restricted
    to the first len(est) signals); ``extra`` adds or overrides columns."""
    est, ref = np.asarray(est, np.float64), np.asarray(truth, np.float64)
    if est.shape != ref.shape:
        raise ValueError(f"{method}: estimate shape {est.shape} != truth shape {ref.shape}")
    kw = _first(scoring or {}, len(ref))
    s = float(np.mean(ssim(est, ref, manifold))) if has_ssim(manifold) else None
    row = {"task": task, "method": method, "time_per_sample_s": float(time_per_sample_s),
           "psnr": float(np.mean(psnr(est, ref, **kw))), "ssim": s,
           "mse": float(np.mean(mse(est, ref, **kw))), "coverage90": None, "crps": None,
           "training_s": None, "break_even_n": None, "n_eval": int(ref.shape[0])}
    return row | extra


#: row key: the method's mean PSNR (dB) on the signals FlowPerY ran on (the first ``fpy_n``)
FPY_PSNR = "psnr_flowpery_signals"
#: its Markdown column (``extra`` of :func:`markdown_table`)
FPY_COLUMN = (FPY_PSNR, "PSNR on the signals every method ran on (dB)", ".2f")


#: the speed-up columns (:func:`add_speedups`) every results table shows where rows have them
SPEED_COLUMNS = (("speedup", "× DPS per sample", ".0f"),
                 ("batch_per_field_s", "per field in a batch (s)", ".2e"),
                 ("speedup_batch", "× DPS per sample, batch", ".0f"))


def markdown_table(rows: list[dict], *, extra: tuple[tuple[str, str, str], ...] = ()) -> str:
    """Rows as a Markdown table. ``extra``: (key, header, format) columns appended, each only
    where some row has a value for it (a "–" marks a row without one)."""
    def fmt(value, spec):
        return "–" if value is None else format(value, spec)

    extra = [c for c in extra if any(r.get(c[0]) is not None for r in rows)]
    cols = [("method", "method", "s"), ("time_per_sample_s", "time / sample (s)", ".2e"),
            ("psnr", "PSNR (dB)", ".2f"), ("ssim", "SSIM", ".3f"), ("mse", "MSE", ".2e"),
            ("coverage90", "cov90", ".3f"), ("crps", "CRPS", ".2e"),
            ("training_s", "training (s)", ".0f"),
            ("break_even_n", "N*", ".1f"), ("n_eval", "n", "d"), *extra]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    multi = len(tasks) > 1
    head = ("| task " if multi else "") + "| " + " | ".join(h for _, h, _ in cols) + " |"
    rule = ("|---" if multi else "") + "|---" * len(cols) + "|"
    lines = [head, rule]
    for task in tasks:
        chosen = sorted((r for r in rows if r["task"] == task),
                        key=lambda r: ORDER.index(r["method"]) if r["method"] in ORDER else len(ORDER))
        for r in chosen:
            cells = [fmt(r.get(k), f) for k, _, f in cols]
            lines.append(("| " + task + " " if multi else "") + "| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def meta(seed: int, data_source: str, cfg, **extra) -> dict:
    """The ``meta`` block of the result JSON."""
    return {"seed": seed, "data_source": data_source, "machine": machine_info(),
            "versions": versions(), "config": dataclasses.asdict(cfg),
            "conventions": __doc__.split("Conventions (every script):")[1].strip()} | extra


def write_outputs(out: Path, result: dict, title: str, *, notes: str = "", extra=()) -> str:
    """Write ``results.json`` and ``results.md`` to ``out``; returns the Markdown table (with the
    :data:`FPY_COLUMN` of runs that have FlowPerY after the ``extra`` columns)."""
    write_json(out / "results.json", result)
    table = markdown_table(result["rows"], extra=(*extra, *SPEED_COLUMNS, FPY_COLUMN))
    (out / "results.md").write_text(f"# {title}\n\nData: {result['meta']['data_source']}.\n\n"
                                    f"{table}\n\n{notes}\n")
    return table


# ---------------------------------------------------------------------------------- stages
#: flow settings added after full-mode stages were cached, with the values that compute what those
#: stages computed before. They change only the stages of the amortized flow (APS, its rows,
#: FlowPerY), so they stay out of the run's hash and tag those stages' names instead
#: (:func:`aps_tag`): the baselines are shared between flow variants, and old stages stay valid.
APS_FLOW_EXTRA = {"aps_encoder_width": 0, "aps_encoder_blocks": 2}


#: calibration settings added after full-mode stages were cached: they change only the calibrated
#: rows (APS[…,τ], APS[mixture,τ]), so they stay out of the run's hash and tag those stages' names
#: (:func:`cal_tag`); the fits they calibrate are shared.
CAL_EXTRA = {"calib_on": "train"}

#: settings of work done after the cached stages only (:func:`batch_timing`): out of the hash
UNCACHED = ("batch_fields",)


def _extra_tag(s, neutral: dict) -> str:
    """"" when ``s`` has the ``neutral`` values of those settings, else "-" and a short hash."""
    extra = {k: getattr(s, k) for k in neutral}
    if extra == neutral:
        return ""
    return "-" + hashlib.sha1(json.dumps(extra, sort_keys=True).encode()).hexdigest()[:6]


def cal_tag(s) -> str:
    """"" at the :data:`CAL_EXTRA` values, else "-" and a short hash of the settings."""
    return _extra_tag(s, CAL_EXTRA)


def calibration_signals(s, held_out, val):
    """The clean signals τ is set on: ``held_out`` (training-split signals held out of the pair
    objectives) when ``s.calib_on == "train"``; with ``"val"`` the task's validation signals
    ``val`` (never test signals), tiled cyclically to ``s.calib_n`` pairs, each measured with
    its own mask and noise. The second targets a shift between the training and test
    distributions (ERA5-like training fields, real GloSea4 test fields); ``val`` then also tunes
    DPS's ζ.

    Args:
        s: settings (``calib_on``, ``calib_n``).
        held_out: (N, V, C) held-out training-split signals.
        val: (M, V, C) validation signals, M ≥ 1, or None.

    Returns:
        (K, V, C) float32 signals.
    """
    if s.calib_on == "train":
        return held_out
    if s.calib_on != "val":
        raise ValueError(f"calib_on must be 'train' or 'val', got {s.calib_on!r}")
    if val is None or len(val) == 0:
        raise ValueError("calib_on='val' needs validation signals (val), got none")
    val = np.asarray(val, np.float32)
    return val[np.arange(max(s.calib_n, len(val))) % len(val)]


def aps_tag(s) -> str:
    """"" at the :data:`APS_FLOW_EXTRA` values, else "-" and a short hash of the settings."""
    return _extra_tag(s, APS_FLOW_EXTRA)


def panel_label(method: str) -> str:
    """A figure panel's title for a method's estimate: 128-sample means say so, and the paper's
    sampler says which loss it was trained with."""
    if method == "APS(128)":
        return "APS(128) mean (paper's loss)"
    return method.replace("(128)", "(128) mean")


class Stages:
    """Resumable cached stages of a full-mode run: ``$GEODIFF_CACHE/bench/<name>-<hash>/``, the
    hash taken over the config and the bytes of the files in ``depends`` (the prior checkpoints),
    so a changed setting or a retrained prior starts afresh. A stage's result is a dict of arrays
    plus a JSON-able dict, written atomically; a rerun loads finished stages instead of computing
    them. ``enabled=False`` (smoke and quick modes) computes everything every time."""

    def __init__(self, name: str, cfg, *, enabled: bool, fresh: bool = False, depends=()):
        # ``tasks`` only picks which stages run (every stage name carries its task), so a run of
        # one task and a later run of all share their stages
        settings = {k: v for k, v in dataclasses.asdict(cfg).items()
                    if k not in APS_FLOW_EXTRA and k not in CAL_EXTRA and k != "tasks"
                    and k not in UNCACHED}
        h = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode())
        for path in depends if enabled else ():
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"depends: {path} is not a file (stages are keyed by the "
                                        f"content of the priors they use)")
            h.update(hashlib.sha1(path.read_bytes()).digest())
        digest = h.hexdigest()[:10]
        self.enabled = enabled
        self.dir = cache_dir("bench") / f"{name}-{digest}" if enabled else None
        if fresh and self.dir is not None and self.dir.exists():
            shutil.rmtree(self.dir)
        if self.dir is not None:
            print(f"stages cached in {self.dir} (--fresh to start again)")

    def path(self, stage: str) -> Path | None:
        return None if self.dir is None else self.dir / stage

    def run(self, stage: str, fn):
        """``fn() -> (arrays: dict[str, ndarray], info: dict)``, cached under ``stage``."""
        if self.enabled:
            arrays_path, info_path = self.dir / f"{stage}.npz", self.dir / f"{stage}.json"
            if arrays_path.exists() and info_path.exists():
                with np.load(arrays_path) as f:
                    arrays = {k: f[k] for k in f.files}
                print(f"[stage {stage}] loaded from {self.dir}")
                return arrays, json.loads(info_path.read_text())
        arrays, info = fn()
        if self.enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = arrays_path.with_suffix(".tmp.npz")
            np.savez(tmp, **{k: np.asarray(v) for k, v in arrays.items()})
            os.replace(tmp, arrays_path)
            tmp = info_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(info))
            os.replace(tmp, info_path)
        return arrays, info


# --------------------------------------------------------------------------------- runners
def run_closed_form(task, name, fn, args, truth, manifold, *, repeats: int, scoring=None,
                    **kwargs):
    """Time ``fn(*args, **kwargs)`` on the whole test batch; one row and the estimate."""
    secs, est = time_call(fn, *args, repeats=repeats, **kwargs)
    est = np.asarray(est)
    return score(task, name, est, truth, manifold, time_per_sample_s=secs / len(est),
                 scoring=scoring), est


def run_diffusion(task, method, prior, op, meas, truth, manifold, val_meas, val_truth, *,
                  steps: int, zetas, tune_steps: int, seed: int, scoring=None):
    """DPS or MCG (``method`` = ``"DPS"``/``"MCG"``): ζ tuned on validation measurements (never a
    test one) with ``tune_steps`` reverse steps, one sample per test measurement; time per sample
    from a separate one-measurement run after a compiling one. Returns (row, estimate (B, V, C), info)."""
    from geodiff.baselines import dps, mcg, tune_zeta

    fn = {"DPS": dps, "MCG": mcg}[method]
    zeta, scores = tune_zeta(jax.random.key(seed + 2), prior, op, val_meas, val_truth, zetas=zetas,
                             steps=tune_steps, method=fn)
    print(f"{method}: ζ tuned on {len(val_truth)} validation signals: {scores} → ζ = {zeta}")
    one = meas[0:1]
    secs, _ = time_call(fn, jax.random.key(0), prior, op, one, n=1, steps=steps, zeta=zeta, repeats=1)
    est = np.asarray(fn(jax.random.key(seed + 3), prior, op, meas, n=1, steps=steps, zeta=zeta)[0])
    info = {"zeta": zeta, "zeta_scores_on_validation": {str(k): v for k, v in scores.items()},
            "nfe": steps}
    return (score(task, method, est, truth, manifold, time_per_sample_s=secs, scoring=scoring)
            | info, est, info)


def run_dps_ensemble(task, prior, op, meas, truth, manifold, *, zeta: float, steps: int,
                     chains: int, n_signals: int, seed: int, scoring=None):
    """The DPS ensemble: the mean of ``chains`` independent chains on the first ``n_signals`` test
    measurements (ζ of the tuned DPS row), with their 90% coverage and fair CRPS; time per sample
    from the ensemble call. Returns (row, mean (n, V, C))."""
    from geodiff.baselines import dps

    n = min(n_signals, len(truth))
    sub = meas[:n]
    t0 = time.perf_counter()
    xs = np.asarray(jax.block_until_ready(dps(jax.random.key(seed + 4), prior, op, sub, n=chains,
                                              steps=steps, zeta=zeta)), np.float64)
    secs = time.perf_counter() - t0                       # compile included: one long call
    ref = np.asarray(truth[:n], np.float64)
    kw = _first(scoring or {}, n)
    row = score(task, f"DPS×{chains}", xs.mean(0), ref, manifold,
                time_per_sample_s=secs / (n * chains), scoring=scoring,
                coverage90=float(np.mean(coverage(xs, ref, **kw))),
                crps=float(np.mean(crps(xs, ref, fair=True, **kw))), zeta=zeta, nfe=steps,
                chains=chains)
    return row, xs.mean(0)


def fit_aps(sampler, train_meas, *, steps: int, batch_size: int, learning_rate: float, seed: int,
            stages: Stages, stage: str = "aps", progress: bool = True, objective: str = "reverse",
            signals=None, validation=None):
    """Train (or load the cached) amortized sampler. Full mode checkpoints inside the fit, so an
    interrupted run resumes at its last checkpoint, and keeps the finished sampler as a stage.
    Returns (trained sampler, info with training_s, step_s, base_s, loss start/end)."""
    from geodiff import AmortizedSampler
    from geodiff.train import CHECKPOINT_NAME

    done = stages.path(f"{stage}-sampler.npz")
    info_path = stages.path(f"{stage}-sampler.json")
    if done is not None and done.exists() and info_path.exists():
        print(f"[stage {stage}] loaded the trained sampler from {done}")
        return AmortizedSampler.load(done), json.loads(info_path.read_text())
    ckpt = stages.path(f"{stage}-ckpt")
    resumed = ckpt is not None and (ckpt / CHECKPOINT_NAME).exists()
    trained, hist = sampler.fit(jax.random.key(seed + 102), train_meas, steps=steps,
                                objective=objective, signals=signals, validation=validation,
                                batch_size=batch_size, learning_rate=learning_rate,
                                checkpoint_dir=ckpt, progress=progress)
    # the history's clock runs on across resumes (a wall clock here would see only the last part)
    train_s = hist["base_s"] + hist["time"][-1]
    info = {"training_s": train_s, "resumed": resumed, "steps": steps, "batch_size": batch_size,
            "learning_rate": learning_rate, "step_s": hist["step_s"], "base_s": hist["base_s"],
            "loss_first": float(hist["loss"][0]), "loss_last": float(hist["loss"][-1]),
            "train_measurements": None if train_meas is None else int(train_meas.y.shape[0]),
            "objective": objective, "train_signals": None if signals is None else len(signals),
            "validation": hist.get("validation")}
    print(f"APS ({stage}): {steps} steps in {train_s:.0f} s ({hist['step_s']:.2f} s/step, base "
          f"{hist['base_s']:.0f} s), loss {info['loss_first']:.3f} → {info['loss_last']:.3f}")
    if done is not None:
        done.parent.mkdir(parents=True, exist_ok=True)
        trained.save(done)
        info_path.write_text(json.dumps(info))
    return trained, info


def aps_rows(task, trained, info, meas, truth, manifold, *, seed: int, repeats: int,
             dps_time: float | None, name: str = "APS", scoring=None, **extra):
    """Rows ``<name>(1)`` and ``<name>(128)`` of a trained sampler on the test measurements, with
    coverage and fair CRPS of the 128 samples and the break-even N* against ``dps_time`` (s per
    measurement); ``extra`` columns go on both rows.
    Returns (rows, mean (B, V, C), std (B, V, C), one sample (B, V, C))."""
    one = meas[0]
    repeats = max(repeats, 5)          # millisecond calls: a median of 5 resists a busy machine
    t1, _ = time_call(trained.sample, jax.random.key(1), one, 1, repeats=repeats)
    t128, _ = time_call(trained.sample, jax.random.key(1), one, 128, repeats=repeats)
    x1 = np.asarray(trained.sample(jax.random.key(seed + 103), meas, 1)[0])
    xs = np.asarray(trained.sample(jax.random.key(seed + 104), meas, 128))
    ref = np.asarray(truth, np.float64)
    kw = _first(scoring or {}, len(ref))
    cov = float(np.mean(coverage(xs, ref, **kw)))
    crps128 = float(np.mean(crps(xs, ref, fair=True, **kw)))
    mean, std = xs.mean(0), xs.std(0)
    rows = []
    for label, est, per_call, n in ((f"{name}(1)", x1, t1, 1), (f"{name}(128)", mean, t128, 128)):
        gain = None if dps_time is None else dps_time - per_call
        rows.append(score(task, label, est, truth, manifold, time_per_sample_s=per_call / n,
                          time_per_measurement_s=per_call, scoring=scoring,
                          coverage90=cov if n == 128 else None, crps=crps128 if n == 128 else None,
                          training_s=info["training_s"],
                          break_even_n=info["training_s"] / gain if gain and gain > 0 else None,
                          steps=info["steps"], train_measurements=info["train_measurements"],
                          temperature=trained.temperature, centre=trained.centre, **extra))
    return rows, mean, std, x1


#: quantile levels of the batched summaries :func:`batch_timing` times (archive_throughput's)
BATCH_QUANTILES = (0.05, 0.5, 0.95)


def batch_timing(samplers: dict, meas, *, batch: int, n: int = 128, repeats: int = 5) -> dict:
    """Per-field seconds of a batch of measurements summarized in one compiled call.

    Args:
        samplers: {row name without "(n)": AmortizedSampler}.
        meas: test measurements (B, …); the first ``min(batch, B)`` are summarized.
        batch: measurements per call (≥ 1).
        n: samples per measurement (≥ 2).
        repeats: timed calls (median); one untimed call first absorbs compilation.

    Returns:
        {name: seconds per field} of ``iter_posterior(key, meas[:batch], n, chunk=batch,
        quantiles=BATCH_QUANTILES)`` (mean, std, quantiles of the n draws of every field).
    """
    if batch < 1:
        raise ValueError(f"batch must be ≥ 1, got {batch}")
    b = min(int(batch), int(meas.y.shape[0]))
    sub = meas[:b]
    out, seen = {}, {}
    for name, sampler in samplers.items():
        if id(sampler) not in seen:        # a sampler behind several rows is timed once
            def go(sampler=sampler):
                return [c.mean for c in sampler.iter_posterior(jax.random.key(1), sub, n, chunk=b,
                                                               quantiles=BATCH_QUANTILES)]
            seen[id(sampler)] = time_call(go, repeats=repeats)[0] / b
        out[name] = seen[id(sampler)]
    return out


def add_speedups(rows: list[dict], per_field: dict, *, dps_time: float | None, n: int = 128,
                 batch: int) -> None:
    """Add ``speedup`` to every ``APS…(k)`` row and ``batch_per_field_s``, ``batch_fields`` and
    ``speedup_batch`` to the ``(n)`` rows of the samplers in ``per_field`` (in place; the
    conventions in this module's docstring). ``dps_time``: DPS seconds per sample (None: no
    speed-ups)."""
    for r in rows:
        m = re.fullmatch(r"(APS.*)\((\d+)\)", r["method"])
        if m is None:
            continue
        name, k = m[1], int(m[2])
        if dps_time:
            r["speedup"] = dps_time / r["time_per_sample_s"]
        if k == n and name in per_field:
            r["batch_per_field_s"] = per_field[name]
            r["batch_fields"] = batch
            if dps_time:
                r["speedup_batch"] = dps_time * n / per_field[name]


def mixture_stand_in(gauss, *, components: int, rank: int):
    """A :class:`~geodiff.amortized.MixtureSurrogate` with the shapes of a K-component rank-R
    EM fit (K copies of the Gaussian fit ``gauss`` = (mean, factor, nugget), its factor cut or
    zero-padded to R columns, equal weights): for timing, whose cost depends on shapes only."""
    import jax.numpy as jnp

    from geodiff.amortized import MixtureSurrogate

    mean, factor, nugget = (np.asarray(a, np.float32) for a in gauss)
    f = np.zeros((factor.shape[0], rank), np.float32)
    f[:, : min(rank, factor.shape[1])] = factor[:, :rank]
    rep = lambda a: jnp.asarray(np.broadcast_to(a, (components, *a.shape)))   # noqa: E731
    return MixtureSurrogate(rep(mean), rep(f), rep(nugget),
                            jnp.full((components,), -np.log(components), jnp.float32))


def run_flow_per_y(task, sampler, meas, truth, manifold, *, n_eval: int, steps: int,
                   batch_size: int, learning_rate: float, seed: int, scoring: dict | None = None):
    """FlowPerY (Feng et al.): the same flow and prior, trained from scratch on each of the first
    ``n_eval`` test measurements; time per sample = (training + 128 draws) / 128 per measurement;
    scored (PSNR, coverage) with the task's ``scoring`` like every other row."""
    from tqdm.auto import tqdm

    from geodiff.baselines import flow_per_y

    n_eval = min(n_eval, len(truth))
    means, draws, secs = [], [], []
    for i in tqdm(range(n_eval), desc=f"FlowPerY ({steps} steps each)", unit="y", disable=n_eval < 2):
        t0 = time.perf_counter()
        xs, _, _ = flow_per_y(jax.random.key(seed + 200 + i), sampler, meas[i], n=128, steps=steps,
                              batch_size=batch_size, learning_rate=learning_rate,
                              warmup_steps=min(100, steps // 4), progress=False)
        xs = np.asarray(jax.block_until_ready(xs))
        secs.append(time.perf_counter() - t0)
        means.append(xs.mean(0))
        draws.append(xs)
    samples = np.stack(draws, axis=1)   # (128, n_eval, V, C)
    sc = _first(scoring or {}, n_eval)
    cov = float(np.mean(coverage(samples, np.asarray(truth[:n_eval]), **sc)))
    # the first call compiles: time the others when there are any
    per_y = float(np.median(secs[1:] if len(secs) > 1 else secs))
    row = score(task, "FlowPerY", np.stack(means), truth[:n_eval], manifold,
                time_per_sample_s=per_y / 128, time_per_measurement_s=per_y, coverage90=cov,
                steps=steps, scoring=sc)
    return row, np.stack(means)


# ------------------------------------------------------------------------------------ CLI
def parser(doc: str) -> argparse.ArgumentParser:
    """The command line every comparison script shares (API.md)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a few minutes on 2 CPU cores")
    mode.add_argument("--smoke", action="store_true", help="tiny run for CI (seconds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results JSON here")
    p.add_argument("--save-sampler", default=None,
                   help="write the trained amortized sampler here (AmortizedSampler.load); "
                        "scripts that train several write <stem>-<task><suffix> beside it")
    p.add_argument("--fresh", action="store_true",
                   help="full mode: ignore cached stages and compute everything again")
    p.add_argument("--aps-steps", type=int, default=None,
                   help="override the mode's APS optimizer steps (studies of training length)")
    p.add_argument("--aps-encoder-width", type=int, default=None,
                   help="override the width of the flow's condition encoder (0: none); its "
                        "stages are cached beside the other variants', sharing the baselines")
    p.add_argument("--aps-objectives", nargs="*", default=None,
                   choices=["reverse", "pairs", "pairs+reverse"],
                   help="override the mode's calibrated APS[objective,τ] rows (none: only the "
                        "paper's APS rows); a full-mode run that must fit in a session")
    p.add_argument("--calibrate-on", choices=["train", "val"], default=None,
                   help="set τ of the calibrated APS rows on held-out training-split signals "
                        "(train, the default) or on the validation signals, tiled to calib_n "
                        "pairs with fresh masks (val); only those rows are computed again")
    p.add_argument("--fpy-n", type=int, default=None,
                   help="override the number of signals FlowPerY runs on (0: no FlowPerY row)")
    p.add_argument("--prior-t0", type=float, default=None,
                   help="use (and train if missing) priors with this VPSDE t0 instead of 1e-3; it "
                        "sets the ELBO's decoder noise, which APS trains against (docs/amortized.md)")
    return p


def mode_name(args) -> str:
    return "smoke" if args.smoke else "quick" if args.quick else "full"


def main(doc: str, run, modes: dict, out: str, argv=None, *, tasks: tuple | None = None) -> dict:
    """The ``main`` of a comparison script: parse the shared flags (plus ``--out`` and, when
    ``tasks`` is given, ``--tasks``), pick the mode's config, run, write ``--json``."""
    p = parser(doc)
    p.add_argument("--out", default=out, help="output folder")
    if tasks:
        p.add_argument("--tasks", nargs="+", choices=list(tasks), default=None)
    args = p.parse_args(argv)
    cfg = dataclasses.replace(modes[mode_name(args)], seed=args.seed, prior_t0=args.prior_t0)
    if args.aps_steps is not None:
        if args.aps_steps < 1:
            raise SystemExit(f"--aps-steps must be ≥ 1, got {args.aps_steps}")
        cfg = dataclasses.replace(cfg, aps_steps=args.aps_steps)
    if args.aps_encoder_width is not None:
        if args.aps_encoder_width < 0:
            raise SystemExit(f"--aps-encoder-width must be ≥ 0, got {args.aps_encoder_width}")
        cfg = dataclasses.replace(cfg, aps_encoder_width=args.aps_encoder_width)
    if args.fpy_n is not None:
        if args.fpy_n < 0:
            raise SystemExit(f"--fpy-n must be ≥ 0, got {args.fpy_n}")
        cfg = dataclasses.replace(cfg, fpy_n=args.fpy_n)
    if args.aps_objectives is not None:
        cfg = dataclasses.replace(cfg, aps_objectives=tuple(args.aps_objectives))
    if args.calibrate_on is not None:
        cfg = dataclasses.replace(cfg, calib_on=args.calibrate_on)
    if tasks and args.tasks:
        cfg = dataclasses.replace(cfg, tasks=tuple(args.tasks))
    result = run(cfg, Path(args.out), fresh=args.fresh, save_sampler=args.save_sampler)
    if args.json:
        write_json(args.json, result)
    return result


# ------------------------------------------------------------------------- one whole task
@dataclasses.dataclass(frozen=True)
class Settings:
    """The settings :func:`compare` reads (each script's mode table fills them)."""

    seed: int = 0
    n_test: int = 100            # test signals evaluated
    n_tune: int = 4              # validation signals for ζ
    repeats: int = 3             # timing repeats
    rank: int = 256              # Gaussian fit rank (kriging and the APS surrogate)
    dps_steps: int = 1000        # DPS / MCG reverse steps (NFE)
    zetas: tuple = (0.1, 0.3, 1.0, 3.0)   # ζ candidates (normalized data units)
    # ζ is tuned at the evaluation's own step count: DPS applies ζ once per step, so a ζ tuned
    # on shorter chains over-corrects on longer ones (measured: bunny ζ = 3 best at 100 steps,
    # 5.6 dB worse than ζ = 1 at 1000)
    mcg: bool = True             # also run MCG (masking tasks only)
    aps_train: int = 2000        # training measurements of APS
    aps_steps: int = 2000
    aps_batch: int = 32
    aps_lr: float = 3e-4
    aps_n_t: int = 2
    aps_hidden: int = 256        # flow conditioner width
    aps_couplings: int = 8       # flow coupling pairs (n_steps)
    aps_n_eig: int = 64          # spectral conditioner modes
    aps_local_hidden: int = 32   # per-vertex ring MLP of the conditioners (0: off); it pays off
    #                              only over long runs (docs/amortized.md), so quick mode turns it off
    aps_encoder_width: int = 0   # the flow's condition encoder (0: none); see docs/amortized.md
    aps_encoder_blocks: int = 2
    fpy_n: int = 2               # test measurements FlowPerY is trained on (one flow each)
    fpy_steps: int = 200         # FlowPerY optimizer steps per measurement
    aps_objectives: tuple = ("reverse", "pairs")   # each gets calibrated rows APS[obj,τ]
    aps_mixture_k: int = 4       # components of the APS[mixture,τ] base (0: no such row)
    aps_mixture_rank: int = 256  # their rank (rank mattered more than K on the bunny digits)
    aps_mixture_n: int = 4000    # signals of the EM fit (the first of the Gaussian fit's set)
    calib_n: int = 100           # training-split signals held out of the pair objectives for τ
    calib_samples: int = 32      # samples per pair while calibrating
    calib_iters: int = 10        # bisection steps of calibrate
    calib_on: str = "train"      # τ set on held-out training-split signals, or "val": on the
    #                              validation signals (calibration_signals)
    dps_chains: int = 8          # the DPS ensemble: chains per measurement …
    dps_ensemble_n: int = 16     # … on this many test measurements (0: no ensemble row)
    prior_t0: float | None = None  # VPSDE t0 of the diffusion prior (None: 1e-3, the default)
    batch_fields: int = 64       # test measurements of the batched per-field timing (0: none)


def slug(task: str) -> str:
    """An ASCII file-name form of a task label (cache stage names)."""
    return "".join(c if c.isascii() and c.isalnum() else "-" for c in task.lower()).strip("-")


def make_aps(s: Settings, manifold, prior, op, gauss, **kw):
    """An untrained APS for ``op`` with the Gaussian fit ``gauss`` = (mean, factor, nugget) as its
    surrogate and the flow sizes of ``s`` (``kw``: more sampler arguments, e.g. ``centre``)."""
    from geodiff import AmortizedSampler
    from geodiff.amortized import GaussianSurrogate

    sur = GaussianSurrogate(*(np.asarray(a, np.float32) for a in gauss))
    return AmortizedSampler(manifold, prior, op, surrogate=sur, n_t=s.aps_n_t, seed=s.seed, **kw,
                            hidden=s.aps_hidden, n_steps=s.aps_couplings, n_eig=s.aps_n_eig,
                            local_hidden=s.aps_local_hidden, encoder_width=s.aps_encoder_width,
                            encoder_blocks=s.aps_encoder_blocks)


def train_aps(s: Settings, sampler, signals, stages: Stages, stage: str):
    """Train ``sampler`` (cached stage ``stage`` + :func:`aps_tag`) on the measurements of
    ``signals`` by its own operator (PRNG key ``seed + 101``; their clean values are never used).

    Returns:
        (trained sampler, fit info, training measurements).
    """
    train_meas = sampler.operator.measure(jax.random.key(s.seed + 101), signals)
    trained, info = fit_aps(sampler, train_meas, steps=s.aps_steps, batch_size=s.aps_batch,
                            learning_rate=s.aps_lr, seed=s.seed, stages=stages,
                            stage=stage + aps_tag(s),
                            progress=s.aps_steps >= 50)
    return trained, info, train_meas


def _without(signals, drop):
    """``signals`` (N, V, C) without the rows that equal a row of ``drop`` (float32 bytes)."""
    x = np.asarray(signals, np.float32)
    banned = {row.tobytes() for row in np.asarray(drop, np.float32)}
    return x[[i for i in range(len(x)) if x[i].tobytes() not in banned]]


def compare(task: str, s: Settings, *, manifold, prior, op, test, val, train, gauss, stages: Stages,
            aps_op=None, fit_set=None, centre: str = "auto", cal_val=None):
    """Every method on one task: the same prior, measurements and machine.

    Args:
        task: the row label.
        s: settings.
        manifold, prior, op: the signal's manifold, the diffusion prior, the bound operator.
        test: (B, V, C) test signals (measured with key ``seed``).
        val: (B', V, C) validation signals for ζ (key ``seed + 1``), disjoint from ``test``.
        train: (N, V, C) training-split signals. Their *measurements* (key ``seed + 101``) train
            APS with the paper's objective (their clean values unused); the pair objectives
            learn from the clean values of all but the last ``calib_n``, which set the
            temperature τ of every calibrated sampler.
        gauss: (mean, factor, nugget) of the Gaussian fit (kriging and the APS surrogate).
        stages: the run's cached stages.
        aps_op: the operator APS is trained with (default ``op``; the blind setting passes a
            random-ratio mask).
        fit_set: (M, V, C) the signals of the Gaussian fit ``gauss``; the mixture base is fitted
            by EM to its first ``aps_mixture_n`` rows that are not calibration signals (default:
            ``train`` without them). Quick modes train APS on 500 signals: 8 components of rank
            64 on 400 signals overfit (bunny: 21.0 dB against 25.8 with 3,900).
        centre: the ``centre`` of every APS sampler but the mixture rows (``"auto"``: Tweedie
            for Denoise, else the surrogate; ``"pnp"``: the prior's plug-and-play estimate);
            stages other than ``"auto"``'s are cached under their own names.
        cal_val: (M, V, C) the validation signals τ is set on when ``s.calib_on == "val"``
            (default ``val``; :func:`calibration_signals`).

    Returns:
        (rows, estimates {method: (B, V, C)}, APS std (B, V, C), trained sampler, measurements).
        With FlowPerY on, every row also has :data:`FPY_PSNR`, its PSNR on FlowPerY's signals.
    """
    from geodiff import AmortizedSampler
    from geodiff.amortized import GaussianSurrogate
    from geodiff.baselines import harmonic, kriging, noise2score
    from geodiff.operators import Denoise, RandomMask

    key = slug(task)
    meas = op.measure(jax.random.key(s.seed), test)
    sc = scoring(manifold, meas)
    mean, factor, nugget = gauss
    rows, est = [], {}
    truth = np.asarray(test, np.float64)

    def closed(name, fn, *args, **kw):
        def go():
            row, e = run_closed_form(task, name, fn, args, test, manifold, repeats=s.repeats,
                                     scoring=sc, **kw)
            return {"est": e}, row
        arrays, row = stages.run(f"{key}-{name}", go)
        rows.append(row)
        est[name] = arrays["est"]

    closed("Kriging", kriging, op, meas, mean=mean, cov_factor=factor, nugget=nugget)
    # kriging's closed-form CRPS: its posterior std is the surrogate-centred base's std
    sur = GaussianSurrogate(*(np.asarray(a, np.float32) for a in gauss))
    k_std = np.asarray(AmortizedSampler(manifold, prior, op, surrogate=sur, centre="surrogate",
                                        n_steps=1, hidden=4, n_eig=4).base_moments(meas)[1])
    rows[-1]["crps"] = float(np.mean(crps_gaussian(est["Kriging"], k_std, truth, **sc)))
    if isinstance(op, RandomMask):
        closed("Harmonic", harmonic, manifold, op, meas)
    if isinstance(op, Denoise):
        closed("Noise2Score", noise2score, prior, op, meas)
    val_meas = op.measure(jax.random.key(s.seed + 1), val)
    for name in ("DPS", "MCG") if (s.mcg and isinstance(op, RandomMask)) else ("DPS",):
        def go(name=name):
            row, e, _ = run_diffusion(task, name, prior, op, meas, test, manifold, val_meas, val,
                                      steps=s.dps_steps, zetas=s.zetas, tune_steps=s.dps_steps,
                                      seed=s.seed, scoring=sc)
            return {"est": e}, row
        arrays, row = stages.run(f"{key}-DPS" if name == "DPS" else f"{key}-{name}", go)
        rows.append(row)
        est[name] = arrays["est"]
    dps_row = next(r for r in rows if r["method"] == "DPS")
    dps_time = dps_row["time_per_sample_s"]
    if s.dps_ensemble_n > 0:
        def go():
            row, e = run_dps_ensemble(task, prior, op, meas, test, manifold, zeta=dps_row["zeta"],
                                      steps=s.dps_steps, chains=s.dps_chains,
                                      n_signals=s.dps_ensemble_n, seed=s.seed, scoring=sc)
            return {"est": e}, row
        arrays, row = stages.run(f"{key}-DPSx{s.dps_chains}", go)
        rows.append(row)
        est[row["method"]] = arrays["est"]

    the_op = op if aps_op is None else aps_op
    sampler = make_aps(s, manifold, prior, the_op, gauss, centre=centre)
    if centre != "auto":
        key = f"{key}-{centre}"         # the APS stages below; the baselines' are shared
    trained, info, _ = train_aps(s, sampler, train, stages, f"{key}-APS")
    def go():
        aps, mean_, std, x1 = aps_rows(task, trained, info, meas, test, manifold, seed=s.seed,
                                       repeats=s.repeats, dps_time=dps_time, scoring=sc,
                                       learned_from=LEARNED_FROM["reverse"])
        return {"mean": mean_, "std": std, "x1": x1}, {"rows": aps}
    arrays, aps = stages.run(f"{key}-APS{aps_tag(s)}-rows", go)
    rows.extend(aps["rows"])
    timed = {"APS": trained}                # samplers of the batched timing, by row name
    mean_, std, x1 = arrays["mean"], arrays["std"], arrays["x1"]
    est["APS(1)"], est["APS(128)"] = x1, mean_

    # every objective, calibrated on held-out training-split signals (or on the validation
    # signals: calib_on)
    n_cal = min(s.calib_n, max(len(train) // 5, 2))
    fit_signals, cal_signals = train[: len(train) - n_cal], train[len(train) - n_cal:]
    tau_signals = calibration_signals(s, cal_signals, val if cal_val is None else cal_val)
    ctag = cal_tag(s)
    for objective in s.aps_objectives:
        if objective == "reverse":
            model, obj_info = trained, info
        else:
            model, obj_info = fit_aps(
                make_aps(s, manifold, prior, the_op, gauss, centre=centre),
                None if objective == "pairs" else the_op.measure(jax.random.key(s.seed + 101), train),
                steps=s.aps_steps, batch_size=s.aps_batch, learning_rate=s.aps_lr, seed=s.seed,
                stages=stages, stage=f"{key}-APS-{objective}{aps_tag(s)}",
                progress=s.aps_steps >= 50, objective=objective, signals=fit_signals,
                validation=(cal_signals if objective == "pairs" else
                            the_op.measure(jax.random.key(s.seed + 106), cal_signals)))
        name = f"APS[{objective},τ]"
        timed[name] = model                 # τ scales the base: the cost is the same

        def go(model=model, obj_info=obj_info, name=name, objective=objective):
            t0 = time.perf_counter()
            cal = model.calibrate(jax.random.key(s.seed + 105), tau_signals,
                                  n_samples=s.calib_samples, iters=s.calib_iters)
            cal_s = time.perf_counter() - t0
            info_c = obj_info | {"training_s": obj_info["training_s"] + cal_s}
            r, m_, sd_, x1_ = aps_rows(task, cal, info_c, meas, test, manifold, seed=s.seed,
                                       repeats=s.repeats, dps_time=dps_time, name=name,
                                       scoring=sc, learned_from=LEARNED_FROM[objective],
                                       calibration_s=cal_s,
                                       calibration=cal.calibration | {"on": s.calib_on},
                                       chosen=(obj_info.get("validation") or {}).get("chosen"))
            return {"mean": m_, "x1": x1_}, {"rows": r}
        arrays, out = stages.run(f"{key}-APS-{objective}-cal{aps_tag(s)}{ctag}-rows", go)
        rows.extend(out["rows"])
        est[f"{name}(1)"], est[f"{name}(128)"] = arrays["x1"], arrays["mean"]
    if s.aps_mixture_k > 0 and isinstance(the_op, (RandomMask, Denoise)):
        def go():
            from geodiff.amortized import MixtureSurrogate

            t0 = time.perf_counter()
            em_set = (fit_signals if fit_set is None
                      else _without(fit_set, cal_signals))[: s.aps_mixture_n]
            mix = MixtureSurrogate.fit(em_set, components=s.aps_mixture_k,
                                       rank=min(s.aps_mixture_rank, len(em_set) - 1),
                                       seed=s.seed)
            em_s = time.perf_counter() - t0
            model = make_aps(s, manifold, prior, the_op, gauss, centre="mixture", mixture=mix)
            t0 = time.perf_counter()
            cal = model.calibrate(jax.random.key(s.seed + 105), tau_signals,
                                  n_samples=s.calib_samples, iters=s.calib_iters)
            cal_s = time.perf_counter() - t0
            info = {"training_s": em_s + cal_s, "steps": 0, "train_measurements": None}
            r, m_, _, x1_ = aps_rows(task, cal, info, meas, test, manifold, seed=s.seed,
                                     repeats=s.repeats, dps_time=dps_time, name="APS[mixture,τ]",
                                     scoring=sc, calibration_s=cal_s,
                                     calibration=cal.calibration | {"on": s.calib_on},
                                     learned_from="the prior's clean training set (EM mixture "
                                                  "fit; untrained flow)",
                                     mixture={"components": s.aps_mixture_k,
                                              "rank": mix.rank, "em_s": em_s,
                                              "signals": len(em_set),
                                              "loglik": mix.fit_info["loglik"]})
            return {"mean": m_, "x1": x1_}, {"rows": r}
        arrays, out = stages.run(f"{key}-APS-mixture-cal{aps_tag(s)}{ctag}-rows", go)
        rows.extend(out["rows"])
        mix_info = out["rows"][0]["mixture"]
        timed["APS[mixture,τ]"] = make_aps(
            s, manifold, prior, the_op, gauss, centre="mixture",
            mixture=mixture_stand_in(gauss, components=mix_info["components"],
                                     rank=mix_info["rank"]))
        est["APS[mixture,τ](1)"], est["APS[mixture,τ](128)"] = arrays["x1"], arrays["mean"]
    if s.fpy_n > 0:
        def go():
            row, e = run_flow_per_y(task, sampler, meas, test, manifold, n_eval=s.fpy_n,
                                    steps=s.fpy_steps, batch_size=s.aps_batch,
                                    learning_rate=s.aps_lr, seed=s.seed, scoring=sc)
            return {"est": e}, row
        arrays, row = stages.run(f"{key}-FlowPerY{aps_tag(s)}", go)
        rows.append(row)
        est["FlowPerY"] = arrays["est"]
    if s.batch_fields > 0:            # after the stages: measured anew on every rerun
        # calls of seconds to a minute (64 fields × 128 draws): the median of ``repeats`` suffices
        per_field = batch_timing(timed, meas, batch=s.batch_fields, repeats=s.repeats)
        add_speedups(rows, per_field, dps_time=dps_time, batch=min(s.batch_fields, len(test)))
    k = min(len(e) for e in est.values())
    for r in rows:                   # methods scored on fewer signals (FlowPerY, the DPS
        if k < len(test):            # ensemble): every method's PSNR on those, like for like
            r[FPY_PSNR] = float(np.mean(psnr(np.asarray(est[r["method"]][:k], np.float64),
                                             truth[:k], **_first(sc, k))))
    return rows, est, std, trained, meas
