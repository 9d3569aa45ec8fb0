"""Describe priors and operators in a file and rebuild them (for :meth:`AmortizedSampler.save`).

Each ``*_spec`` function returns ``(meta, arrays)``: a JSON-able dict and named NumPy arrays; the
matching ``*_from_spec`` inverts it.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np

from geodiff import operators
from geodiff.diffusion import DiffusionPrior, GaussianMixturePrior, GaussianPrior, VPSDE
from geodiff.manifolds import Manifold

_OPERATORS = ("Denoise", "Mask", "RandomMask", "Blur", "SuperResolution")


def operator_spec(operator) -> dict:
    """JSON-able description of an operator from :mod:`geodiff.operators` (manifold excluded)."""
    name = type(operator).__name__
    if name not in _OPERATORS:
        raise TypeError(f"cannot describe a {name} in a file (supported: {', '.join(_OPERATORS)})")
    fields = {f.name: getattr(operator, f.name) for f in dataclasses.fields(operator)
              if f.name != "manifold"}
    return {"class": name, "fields": {k: list(v) if isinstance(v, tuple) else v
                                      for k, v in fields.items()}}


def operator_from_spec(meta: dict, manifold: Manifold):
    """Rebuild the operator of :func:`operator_spec`, bound to ``manifold``."""
    cls = getattr(operators, meta["class"])
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["fields"].items()}
    return cls(**fields).on(manifold)


def _gaussian_spec(prior: GaussianPrior, prefix: str, arrays: dict) -> dict:
    for name in ("mean", "basis", "variances", "nugget"):
        arrays[f"{prefix}{name}"] = np.asarray(getattr(prior, name))
    return {"class": "GaussianPrior", "channels": prior.channels, "sde": dataclasses.asdict(prior.sde)}


def prior_spec(prior) -> tuple[dict, dict]:
    """(meta, arrays) for a GaussianPrior, GaussianMixturePrior or DiffusionPrior."""
    arrays: dict[str, np.ndarray] = {}
    if isinstance(prior, GaussianPrior):
        return _gaussian_spec(prior, "prior/", arrays), arrays
    if isinstance(prior, GaussianMixturePrior):
        comps = [_gaussian_spec(c, f"prior/{i}/", arrays) for i, c in enumerate(prior.components)]
        arrays["prior/weights"] = np.asarray(prior.weights, np.float64)
        return {"class": "GaussianMixturePrior", "components": comps}, arrays
    if isinstance(prior, DiffusionPrior):
        with tempfile.TemporaryDirectory() as tmp:
            path = prior.save(Path(tmp) / "prior.npz")
            arrays["prior/npz"] = np.frombuffer(path.read_bytes(), dtype=np.uint8)
        return {"class": "DiffusionPrior"}, arrays
    raise TypeError(f"cannot save a prior of type {type(prior).__name__}")


def _gaussian_from(meta: dict, prefix: str, arrays, manifold: Manifold) -> GaussianPrior:
    a = {k: np.asarray(arrays[f"{prefix}{k}"]) for k in ("mean", "basis", "variances", "nugget")}
    return GaussianPrior(manifold, a["mean"], a["basis"], a["variances"], float(a["nugget"]),
                         channels=meta["channels"], sde=VPSDE(**meta["sde"]))


def prior_from_spec(meta: dict, arrays, manifold: Manifold):
    """Rebuild the prior of :func:`prior_spec` on ``manifold``."""
    kind = meta.get("class")
    if kind == "GaussianPrior":
        return _gaussian_from(meta, "prior/", arrays, manifold)
    if kind == "GaussianMixturePrior":
        comps = [_gaussian_from(m, f"prior/{i}/", arrays, manifold)
                 for i, m in enumerate(meta["components"])]
        w = np.asarray(arrays["prior/weights"], np.float64)
        return GaussianMixturePrior(comps, w / w.sum())
    if kind == "DiffusionPrior":
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "prior.npz"
            path.write_bytes(np.asarray(arrays["prior/npz"]).tobytes())
            return DiffusionPrior.load(path, manifold=manifold)
    raise ValueError(f"unknown prior class {kind!r} in the file")


def dumps(meta: dict) -> np.ndarray:
    return np.array(json.dumps(meta))


def loads(a) -> dict:
    return json.loads(str(np.asarray(a)))


__all__ = ["operator_spec", "operator_from_spec", "prior_spec", "prior_from_spec"]
