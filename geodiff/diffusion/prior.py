"""The learned diffusion prior (docs/priors.md, "The learned prior"): a VPSDE score model on any
manifold.

Preconditioning (EDM-style, Karras et al. 2022, with *per-vertex* data statistics). With the
scaled input u = x_t/α_t, the noise ratio λ = σ_t/α_t, and the training data's per-vertex mean m
and std s, the denoiser is

    D(x_t) = m + c_skip (u − m) + c_out F(c_in (u − m), log λ),
    c_skip = s²/(s² + λ²),   c_out = λ s/√(s² + λ²),   c_in = 1/√(s² + λ²),

so that with F = 0 (the zero-initialized start) D is the exact Tweedie denoiser of the independent
per-vertex Gaussian N(m, s²). The score is ∇log p_t(x_t) = −(u − D)/(λ σ_t). F is trained to its
unit-variance target (x − m − c_skip (u − m))/c_out, with t drawn log-uniformly in λ over
[λ(t0), λ(1)], the ELBO's own importance distribution.

Dimension letters: N training signals, B batch, V vertices, C channels, F features, K eigenpairs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from geodiff._cache import atomic_savez, read_npz
from geodiff.diffusion.base import Prior, check_time
from geodiff.diffusion.network import NetGeometry, SpectralScoreNet, net_geometry
from geodiff.diffusion.sde import VPSDE
from geodiff.manifolds import Manifold
from geodiff.manifolds.spec import manifold_from_spec, manifold_spec

FORMAT_VERSION = 1
#: Where the priors shipped inside the package live: ``<name>.npz`` and its model card
#: ``<name>.json`` (data, training, held-out ELBO, licence; docs/priors.md).
PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "pretrained"


@dataclasses.dataclass(frozen=True)
class NetConfig:
    """Score network hyper-parameters (saved with the prior).

    Attributes:
        width: hidden channels per vertex.
        n_blocks: DiffusionNet-style blocks.
        n_eig: eigenpairs used by the spectral diffusion.
        n_pos: Laplacian-eigenvector positional features.
        emb_dim: noise embedding size.
        min_std: floor on the per-vertex data std s (normalized units).
    """

    width: int = 32
    n_blocks: int = 4
    n_eig: int = 64
    n_pos: int = 16
    emb_dim: int = 32
    min_std: float = 1e-3


def _version() -> str:
    from geodiff import __version__
    return __version__


def _features(manifold: Manifold, cfg: NetConfig, mean, std, extra):
    """(V, F) fixed per-vertex inputs: eigenvector features, standardized data mean and log std."""
    pos = manifold.laplacian_features(cfg.n_pos) if cfg.n_pos > 0 else np.zeros((manifold.n_vertices, 0))
    valid = manifold.valid
    def standardize(a):
        a = np.asarray(a, np.float64)
        mu, sd = a[valid].mean(0), a[valid].std(0) + 1e-8
        return np.where(valid[:, None], (a - mu) / sd, 0.0)
    parts = [pos, standardize(mean), standardize(np.log(std))]
    if extra is not None:
        parts.append(np.asarray(extra, np.float64))
    return np.concatenate(parts, axis=1).astype(np.float32)


def _features_digest(features) -> list[float]:
    """(2F,) numbers that change when the (V, F) network inputs change: each column's products
    with two fixed vectors over the vertices (catches a changed sign or eigenbasis on load)."""
    f = np.asarray(features, np.float64)
    v = np.arange(f.shape[0])
    w = np.stack([np.cos(0.37 * v + 0.5), np.sin(1.13 * v + 0.2)], axis=1) / math.sqrt(f.shape[0])
    return [float(a) for a in (w.T @ f).reshape(-1)]


def _net_geometry(manifold: Manifold, cfg: NetConfig) -> tuple[NetGeometry, tuple[float, float]]:
    return net_geometry(manifold, cfg.n_eig)


class DiffusionPrior(Prior):
    """A learned VPSDE prior. Build with :meth:`train` or :meth:`load`.

    Attributes:
        manifold, channels, sde: as in :class:`~geodiff.diffusion.base.Prior`.
        config: the :class:`NetConfig`.
        data_mean, data_std: (V, C) per-vertex statistics of the training data (normalized units).
        features: (V, F) fixed per-vertex network inputs.
        params: the network parameters used for inference (the EMA if training kept one).
    """

    def __init__(self, manifold: Manifold, *, config: NetConfig, params, data_mean, data_std,
                 extra_features=None, channels: int = 1, sde: VPSDE | None = None):
        super().__init__(manifold, channels=channels, sde=sde)
        self.config = config
        # what the normalized units mean (set by whoever normalized the data, e.g. the command
        # line: name, units, offset, scale with data = offset + scale·x); saved with the prior
        self.data_info: dict | None = None
        self.data_mean = jnp.asarray(data_mean, jnp.float32)
        self.data_std = jnp.asarray(data_std, jnp.float32)
        self.extra_features = None if extra_features is None else np.asarray(extra_features, np.float32)
        self.features = jnp.asarray(_features(manifold, config, data_mean, data_std, extra_features))
        self.geometry, tau_range = _net_geometry(manifold, config)
        net = SpectralScoreNet(channels=channels, n_features=self.features.shape[1],
                               width=config.width, n_blocks=config.n_blocks,
                               emb_dim=config.emb_dim, tau_range=tau_range, rngs=nnx.Rngs(0))
        self.graphdef, template = nnx.split(net)
        self.params = template if params is None else params
        self._score_jit = jax.jit(self._score_impl)

    # ------------------------------------------------------------------ network pieces
    @staticmethod
    def init_params(manifold, *, key, config: NetConfig, channels: int, n_features: int):
        geo_unused, tau_range = _net_geometry(manifold, config)
        net = SpectralScoreNet(channels=channels, n_features=n_features, width=config.width,
                               n_blocks=config.n_blocks, emb_dim=config.emb_dim,
                               tau_range=tau_range, rngs=nnx.Rngs(params=key))
        return nnx.split(net)

    def _denoiser(self, params, x_t, t):
        """D(x_t) and the pieces of the preconditioning; x_t (B, V, C), t (B,)."""
        sde = self.sde
        alpha, sigma = sde.alpha(t)[:, None, None], sde.sigma(t)[:, None, None]
        lam = sigma / alpha
        u = x_t / alpha
        m, s = self.data_mean[None], self.data_std[None]
        c_skip = s**2 / (s**2 + lam**2)
        c_out = lam * s / jnp.sqrt(s**2 + lam**2)
        c_in = 1.0 / jnp.sqrt(s**2 + lam**2)
        net = nnx.merge(self.graphdef, params)
        f = net(c_in * (u - m), jnp.log(lam[:, 0, 0]), self.features, self.geometry)
        return m + c_skip * (u - m) + c_out * f, u, lam, f, c_skip, c_out

    def _score_impl(self, params, x, t):
        batch = x.shape[:-2]
        xf = x.reshape(-1, *x.shape[-2:])
        tf = jnp.broadcast_to(jnp.asarray(t, xf.dtype), batch).reshape(-1)
        d, u, lam, *_ = self._denoiser(params, xf, tf)
        sigma = self.sde.sigma(tf)[:, None, None]
        score = -(u - d) / (lam * sigma)
        return (score * self.geometry.valid[None, :, None]).reshape(x.shape)

    def score(self, x, t):
        """∇log p_t(x) from the network, (..., V, C); t scalar or (...,) in [0, 1]."""
        x = self.check_x(x)
        t = check_time(t)
        return self._score_jit(self.params, jnp.asarray(x, jnp.float32), t)

    def dsm_loss(self, params, x, key):
        """Denoising score-matching loss on a batch x (B, V, C): mean squared error of F against
        its unit-variance target, t log-uniform in λ (mass-weighted over vertices)."""
        k_u, k_eps = jax.random.split(key)
        u01 = jax.random.uniform(k_u, (x.shape[0],))
        t = self.sde.sample_likelihood_t(u01)
        x_t, _ = self.sde.perturb(k_eps, x, t)
        _, u, lam, f, c_skip, c_out = self._denoiser(params, x_t, t)
        target = (x - self.data_mean[None] - c_skip * (u - self.data_mean[None])) / c_out
        w = jnp.asarray(self.manifold.mass / self.manifold.area, x.dtype)[None, :, None]
        return jnp.mean(jnp.sum(w * (f - target) ** 2, axis=1))

    # ------------------------------------------------------------------------ training
    @classmethod
    def train(cls, key, manifold: Manifold, data, *, steps: int, batch_size: int = 64,
              config: NetConfig | None = None, learning_rate: float = 2e-3, warmup_steps: int = 200,
              clip_norm: float = 1.0, ema_decay: float | None = 0.999, extra_features=None,
              sde: VPSDE | None = None, checkpoint_dir=None, checkpoint_every: int = 500,
              progress: bool = True, devices=None):
        """Train a prior on clean signals by denoising score matching.

        Args:
            key: PRNG key (initialization and training).
            manifold: where the data live.
            data: (N, V, C) training signals in normalized units.
            steps: optimizer steps.
            batch_size: signals per step.
            config: network hyper-parameters (:class:`NetConfig`).
            learning_rate: Adam peak learning rate (linear warm-up over ``warmup_steps``).
            clip_norm: global gradient-norm clipping.
            ema_decay: decay of the parameter EMA used for inference (None: no EMA).
            extra_features: optional (V, F') extra per-vertex inputs (e.g. a land mask).
            sde: the VPSDE (default β 0.1 → 20, t0 = 1e-3).
            checkpoint_dir: where to write atomic checkpoints and resume from.
            checkpoint_every: steps between checkpoints.
            progress: show a progress bar.
            devices: devices for data parallelism (default: all local devices).

        Returns:
            (prior, history) — the trained :class:`DiffusionPrior` and the training history.
        """
        from geodiff.train import fit

        data = np.asarray(data, np.float32)
        manifold.check_signal(data, "data")
        if data.ndim != 3:
            raise ValueError(f"data must have shape (N, V, C), got {data.shape}")
        config = NetConfig() if config is None else config
        mean = data.mean(axis=0)
        std = np.maximum(data.std(axis=0), config.min_std)
        prior = cls(manifold, config=config, params=None, data_mean=mean, data_std=std,
                    extra_features=extra_features, channels=data.shape[-1], sde=sde)
        k_init, k_fit = jax.random.split(key)
        graphdef, params = cls.init_params(manifold, key=k_init, config=config,
                                           channels=data.shape[-1],
                                           n_features=prior.features.shape[1])
        prior.graphdef = graphdef
        state, history = fit(k_fit, prior.dsm_loss, params, jnp.asarray(data), steps=steps,
                             batch_size=batch_size, learning_rate=learning_rate,
                             warmup_steps=warmup_steps, clip_norm=clip_norm, ema_decay=ema_decay,
                             checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                             progress=progress, devices=devices)
        prior.params = state.ema if state.ema is not None else state.params
        return prior, history

    # --------------------------------------------------------------------------- usage
    def sample(self, key, n: int, *, steps: int = 1000, grid: str = "uniform"):
        """(n, V, C) prior samples by ancestral reverse diffusion (``steps`` network passes)."""
        return self.sample_sde(key, n, steps=steps, grid=grid)

    def log_prob(self, x, *, key=None, steps: int = 100):
        """log p_{t0}(x) by the probability-flow ODE with a Hutchinson trace (needs ``key``)."""
        if key is None:
            raise ValueError("DiffusionPrior.log_prob needs key= for the Hutchinson trace estimate")
        return self.log_prob_ode(x, key=key, steps=steps)

    # ------------------------------------------------------------------------ save/load
    def save(self, path) -> Path:
        """Write the prior to one ``.npz`` file, atomically (config, statistics, parameters,
        :attr:`data_info` and the geodiff version)."""
        path = Path(path)
        flat = {f"param/{'/'.join(map(str, k))}": np.asarray(v)
                for k, v in _flatten(nnx.to_pure_dict(self.params)).items()}
        spec, spec_arrays = manifold_spec(self.manifold)
        meta = {"format": FORMAT_VERSION, "class": "DiffusionPrior", "config": dataclasses.asdict(self.config),
                "channels": self.channels, "sde": dataclasses.asdict(self.sde),
                "manifold": repr(self.manifold), "manifold_spec": spec,
                "n_vertices": self.manifold.n_vertices, "data_info": self.data_info,
                "geodiff_version": _version(), "features_digest": _features_digest(self.features)}
        arrays = {"meta": np.array(json.dumps(meta)), "data_mean": np.asarray(self.data_mean),
                  "data_std": np.asarray(self.data_std), **spec_arrays, **flat}
        if self.extra_features is not None:
            arrays["extra_features"] = self.extra_features
        atomic_savez(path, **arrays)
        return path

    @classmethod
    def load(cls, path, manifold: Manifold | None = None) -> "DiffusionPrior":
        """Read a prior written by :meth:`save`.

        Args:
            path: the ``.npz`` file.
            manifold: None (default) rebuilds the manifold described in the file; or pass the
                manifold object to reuse (it must have the same number of vertices).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"path: no saved prior at {str(path)!r}")
        meta, f = read_npz(path, "meta", "saved DiffusionPrior")
        if meta.get("class") != "DiffusionPrior":
            raise ValueError(f"path: {str(path)!r} is not a saved DiffusionPrior")
        if manifold is None:
            if "manifold_spec" not in meta:
                raise ValueError(f"path: {str(path)!r} does not describe its manifold (saved by "
                                 "an older geodiff); pass manifold=")
            manifold = manifold_from_spec(meta["manifold_spec"], f)
        if meta["n_vertices"] != manifold.n_vertices:
            raise ValueError(f"manifold has {manifold.n_vertices} vertices but the prior was "
                             f"trained on {meta['n_vertices']} ({meta['manifold']})")
        params_flat = {tuple(_key(p) for p in k.split("/")[1:]): v for k, v in f.items()
                       if k.startswith("param/")}
        mean, std = f["data_mean"], f["data_std"]
        extra = f.get("extra_features")
        prior = cls(manifold, config=NetConfig(**meta["config"]), params=None, data_mean=mean,
                    data_std=std, extra_features=extra, channels=meta["channels"],
                    sde=VPSDE(**meta["sde"]))
        pure = nnx.to_pure_dict(prior.params)
        if set(_flatten(pure)) != set(params_flat):
            raise ValueError(f"path: parameters in {str(path)!r} do not match the network config")
        nnx.replace_by_pure_dict(prior.params, _unflatten(params_flat))
        if "features_digest" not in meta:
            warnings.warn(f"{str(path)!r} was saved without a digest of its network inputs "
                          f"(geodiff {meta.get('geodiff_version', '< 0.4')}): whether this "
                          "installation computes the same Laplacian eigenvectors for it is not "
                          "checked (priors on spheres saved before 0.4 need training again)",
                          stacklevel=2)
        else:
            got, want = _features_digest(prior.features), meta["features_digest"]
            if not np.allclose(got, want, rtol=1e-4, atol=1e-4):
                raise ValueError(
                    f"path: the network inputs rebuilt from {prior.manifold!r} differ from those "
                    f"{str(path)!r} was trained with (largest change "
                    f"{np.max(np.abs(np.subtract(got, want))):.3g}): its Laplacian eigenvectors "
                    f"were computed otherwise (saved by geodiff {meta.get('geodiff_version')}, "
                    f"this is {_version()}); train the prior again")
        prior.data_info = meta.get("data_info")          # files before 0.4: None
        return prior

    # ------------------------------------------------------------------ shipped priors
    @staticmethod
    def pretrained_names() -> list[str]:
        """Names of the priors shipped inside this installation of geodiff (sorted)."""
        return sorted(p.stem for p in PRETRAINED_DIR.glob("*.npz")
                      if p.with_suffix(".json").is_file())

    @classmethod
    def pretrained(cls, name: str) -> "DiffusionPrior":
        """A prior shipped inside the package, e.g. ``DiffusionPrior.pretrained("mnist-32x32")``.

        Its model card (:meth:`pretrained_card`) says what it was trained on, how, and its
        held-out ELBO; ``data_info`` says what its normalized units mean.

        Raises:
            ValueError: ``name`` is not one of :meth:`pretrained_names`.
        """
        names = cls.pretrained_names()
        if name not in names:
            raise ValueError(f"name: no shipped prior {name!r}; this geodiff ships {names}")
        return cls.load(PRETRAINED_DIR / f"{name}.npz")

    @classmethod
    def pretrained_card(cls, name: str) -> dict:
        """The model card of a shipped prior: data, training, held-out ELBO and how it was
        computed, licence (a dict read from ``geodiff/pretrained/<name>.json``)."""
        if name not in cls.pretrained_names():
            raise ValueError(f"name: no shipped prior {name!r}; this geodiff ships "
                             f"{cls.pretrained_names()}")
        return json.loads((PRETRAINED_DIR / f"{name}.json").read_text())


def _key(s: str):
    return int(s) if s.isdigit() else s


def _flatten(d, prefix=()):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat):
    out = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = jnp.asarray(v)
    return out
