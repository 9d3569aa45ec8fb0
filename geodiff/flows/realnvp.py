"""Conditional RealNVP on manifold signals (docs/method.md; Dinh et al. 2017, Sun & Bouman's DPI).

Every bijection maps (B, V, C) → (B, V, C) given an optional condition (B, V, Cc) and returns the
log-determinant of its Jacobian, (B,). Padding vertices (``manifold.valid`` False) are left
unchanged and contribute nothing to log-determinants.

Dimension letters: B batch, V vertices, C channels, Cc condition channels, K eigenpairs,
H hidden units.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from geodiff.diffusion.network import DiffusionBlock, net_geometry, ring_mean, ring_table
from geodiff.manifolds import Grid, Manifold, PaddedManifold, Sphere


class Const(nnx.Variable):
    """A fixed array stored in a module (geometry, partitions): not trained."""


def vertex_partition(manifold: Manifold) -> np.ndarray:
    """(V,) bool split of the vertices into two interleaved halves for affine couplings.

    Checkerboard on image grids and lat-lon spheres ((row + column) parity); elsewhere a greedy
    2-colouring along the Laplacian's graph (each vertex takes the colour its already-coloured
    neighbours use least, ties alternating), which interleaves in space. Padding vertices are
    False.
    """
    base = manifold.base if isinstance(manifold, PaddedManifold) else manifold
    if isinstance(base, Grid) or (isinstance(base, Sphere) and base.kind == "latlon"):
        i, j = np.divmod(np.arange(base.n_vertices), base.layout_shape[1])
        part = (i + j) % 2 == 1
    else:
        L = base.laplacian.tocsr()
        part = np.zeros(base.n_vertices, dtype=bool)
        done = np.zeros(base.n_vertices, dtype=bool)
        for v in range(base.n_vertices):
            nb = L.indices[L.indptr[v]:L.indptr[v + 1]]
            nb = nb[(nb != v) & done[nb]]
            ones = int(part[nb].sum())
            zeros = len(nb) - ones
            part[v] = zeros > ones if zeros != ones else bool(v % 2)
            done[v] = True
    return np.pad(part, (0, manifold.n_vertices - base.n_vertices))


def _const_table(tree):
    """A pytree of constant arrays (a geometry table) held as :class:`Const` leaves."""
    return nnx.data(jax.tree.map(lambda a: Const(jnp.asarray(a)), tree))


def _table_value(tree):
    """The arrays of a :func:`_const_table`."""
    return jax.tree.map(lambda v: v[...], tree, is_leaf=lambda v: isinstance(v, Const))


def _plus(a, t):
    """a (N, ...) + t (B, ...) for N = n·B rows laid out as (n, B): row s·B + b gets t[b] (the
    per-condition terms of :meth:`ConditionalRealNVP.prepare` added to n draws per condition)."""
    if a.shape[0] == t.shape[0]:
        return a + t
    return (a.reshape(-1, *t.shape) + t).reshape(a.shape)


class ActNorm(nnx.Module):
    """Per-vertex, per-channel affine map y = x·e^{log_scale} + bias (identity at creation).

    :meth:`initialize` sets it from a batch so that its outputs have zero mean and unit variance
    per entry (data-dependent initialization, Kingma & Dhariwal 2018).
    """

    def __init__(self, n_vertices: int, channels: int, valid):
        self.log_scale = nnx.Param(jnp.zeros((n_vertices, channels)))
        self.bias = nnx.Param(jnp.zeros((n_vertices, channels)))
        self.valid = Const(jnp.asarray(valid, jnp.float32)[:, None])

    def initialize(self, x):
        """Set scale and bias from a batch x (B, V, C)."""
        mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
        self.log_scale[...] = -jnp.log(std) * self.valid[...]
        self.bias[...] = -mean / std * self.valid[...]

    def forward(self, x, condition=None):
        ls = self.log_scale[...] * self.valid[...]
        y = x * jnp.exp(ls) + self.bias[...] * self.valid[...]
        return y, jnp.broadcast_to(jnp.sum(ls), x.shape[:1])

    def inverse(self, y, condition=None):
        ls = self.log_scale[...] * self.valid[...]
        x = (y - self.bias[...] * self.valid[...]) * jnp.exp(-ls)
        return x, jnp.broadcast_to(-jnp.sum(ls), y.shape[:1])


class DenseConditioner(nnx.Module):
    """The paper's conditioner: an MLP on the vectorized input (V·(C + Cc) → H → H → 2·V·C)."""

    def __init__(self, n_vertices: int, channels: int, condition_channels: int, *, hidden: int,
                 rngs: nnx.Rngs):
        self.V, self.C = n_vertices, channels
        d_in = n_vertices * (channels + condition_channels)
        self.l1 = nnx.Linear(d_in, hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.l3 = nnx.Linear(hidden, 2 * n_vertices * channels, rngs=rngs,
                             kernel_init=nnx.initializers.zeros)

    def __call__(self, u):
        h = jax.nn.silu(self.l1(u.reshape(u.shape[0], -1)))
        h = jax.nn.silu(self.l2(h))
        return self.l3(h).reshape(u.shape[0], self.V, 2 * self.C)

    def prepare(self, c):
        """Per-condition terms: the first layer's condition part, (B, H)."""
        W = self.l1.kernel[...].reshape(self.V, -1, self.l1.kernel.shape[-1])
        return {"l1": jnp.einsum("bvi,vih->bh", c, W[:, self.C:]) + self.l1.bias[...]}

    def apply(self, x, terms):
        """``self([x, c])`` from x (N, V, C) and :meth:`prepare`'s terms (B, …), N = n·B."""
        W = self.l1.kernel[...].reshape(self.V, -1, self.l1.kernel.shape[-1])
        h = jax.nn.silu(_plus(jnp.einsum("bvi,vih->bh", x, W[:, : self.C]), terms["l1"]))
        h = jax.nn.silu(self.l2(h))
        return self.l3(h).reshape(x.shape[0], self.V, 2 * self.C)


class SpectralBasis(nnx.Module):
    """The constant tables a flow's spectral conditioners read: Φ (V, K) float32, its mass-weighted
    transpose Φᵀ M (K, V), and the 1-ring table when ring means are used.

    One instance is shared by every coupling of a :class:`ConditionalRealNVP` (flax's graph keeps
    one copy of a module referenced from several places): the program then reads one (V, K) pair
    of tables, which stays in cache, instead of a copy per coupling (on the 46×90 sphere 16 × 2.1
    MB of memory traffic per draw; docs/results.md, "The one-sample floor").

    Args:
        evecs: (V, K) Laplacian eigenvectors.
        mass: (V,) vertex masses.
        ring: the 1-ring table (:func:`~geodiff.diffusion.network.ring_table`) or None.
    """

    def __init__(self, evecs, mass, ring=None):
        evecs = np.asarray(evecs)
        mass = np.asarray(mass)
        if evecs.ndim != 2 or mass.shape != evecs.shape[:1]:
            raise ValueError(f"evecs must be (V, K) and mass (V,), got {evecs.shape} and {mass.shape}")
        self.evecs = Const(jnp.asarray(evecs, jnp.float32))
        # the product in the eigenvectors' own precision, rounded to float32 once
        self.proj = Const(jnp.asarray((evecs * mass[:, None]).T, jnp.float32))
        self.ring = None if ring is None else _const_table(ring)


class SpectralConditioner(nnx.Module):
    """Geometry-aware conditioner whose size grows with V·K, not V².

    Global part: the input's coefficients on the first K Laplacian eigenvectors (Φᵀ M u), an MLP
    on them, mapped back with Φ. Local part: a per-vertex linear map of the input, plus (with
    ``local_hidden`` > 0) a per-vertex MLP on the input and its 1- and 2-ring means, shared by all
    vertices, which can make the sharp, nonlinear corrections above the K-th mode that the global
    part cannot (e.g. the edges of a digit). All output layers start at zero (identity coupling).

    Args:
        evecs: (V, K) Laplacian eigenvectors, or a :class:`SpectralBasis` to share (then ``mass``
            and ``ring`` are taken from it and must be None).
        mass: (V,) vertex masses; None with a :class:`SpectralBasis`.
        channels: C, the signal's channels; the input has C + Cc channels.
        condition_channels: Cc, the condition's channels.
        hidden: H of the global MLP.
        ring: the 1-ring table (:class:`~geodiff.diffusion.network.RingTable`, from
            :func:`~geodiff.diffusion.network.ring_table`), needed when ``local_hidden`` > 0
            (unused otherwise); None with a :class:`SpectralBasis`, which holds it.
        local_hidden: hidden units of the per-vertex MLP (0: linear local part only).
        global_channels: how many leading input channels the global part and the ring means see
            (None: all). The channels after them (a :class:`ConditionEncoder`'s features) go to
            the local linear map and to the per-vertex MLP's first layer as they are, not through
            the ring means (the encoder has its own receptive field), which keeps the global
            MLP's input at K·(C + Cc) and the ring gathers at C + Cc channels.

    Raises:
        ValueError: ``mass`` or ``ring`` given beside a :class:`SpectralBasis`; ``local_hidden``
            > 0 without a ring table; ``evecs`` and ``mass`` of mismatched shapes.
    """

    def __init__(self, evecs, mass, channels: int, condition_channels: int, *, hidden: int,
                 rngs: nnx.Rngs, ring=None, local_hidden: int = 0, global_channels: int | None = None):
        if isinstance(evecs, SpectralBasis):
            if mass is not None or ring is not None:
                raise ValueError("with a SpectralBasis, pass mass=None and ring=None (the basis "
                                 "holds them)")
            basis = evecs
        else:
            basis = SpectralBasis(evecs, mass, ring if local_hidden else None)
        self.basis = basis
        K = basis.evecs.shape[1]
        self.C = channels
        c_in = channels + condition_channels
        self.c_glob = c_in if global_channels is None else int(global_channels)
        self.g1 = nnx.Linear(K * self.c_glob, hidden, rngs=rngs)
        self.g2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.g3 = nnx.Linear(hidden, K * 2 * channels, rngs=rngs, kernel_init=nnx.initializers.zeros)
        self.local = nnx.Linear(c_in, 2 * channels, rngs=rngs, kernel_init=nnx.initializers.zeros)
        self.local_hidden = int(local_hidden)
        if self.local_hidden:
            if basis.ring is None:
                raise ValueError("local_hidden > 0 needs the neighbour table: ring= (a RingTable), "
                                 "or a SpectralBasis built with ring=")
            self.l1 = nnx.Linear(2 * self.c_glob + c_in, local_hidden, rngs=rngs)
            self.l2 = nnx.Linear(local_hidden, local_hidden, rngs=rngs)
            self.l3 = nnx.Linear(local_hidden, 2 * channels, rngs=rngs,
                                 kernel_init=nnx.initializers.zeros)

    def _ring_mean(self, h):
        """Weighted 1-ring mean (:func:`~geodiff.diffusion.network.ring_mean`), (B, V, W)."""
        return ring_mean(h, _table_value(self.basis.ring))

    def __call__(self, u):
        B, V, c_in = u.shape
        coef = jnp.einsum("kv,bvi->bki", self.basis.proj[...], u[..., : self.c_glob]).reshape(B, -1)
        h = jax.nn.silu(self.g1(coef))
        h = jax.nn.silu(self.g2(h))
        out = self.g3(h).reshape(B, -1, 2 * self.C)
        glob = jnp.einsum("vk,bko->bvo", self.basis.evecs[...], out)
        out = glob + self.local(u.reshape(B * V, c_in)).reshape(B, V, 2 * self.C)
        if self.local_hidden:
            r1 = self._ring_mean(u[..., : self.c_glob])
            feats = jnp.concatenate([u, r1, self._ring_mean(r1)], axis=-1)
            feats = feats.reshape(B * V, 2 * self.c_glob + c_in)
            h = jax.nn.silu(self.l1(feats))
            h = jax.nn.silu(self.l2(h))
            out = out + self.l3(h).reshape(B, V, 2 * self.C)
        return out

    # Every first layer is linear in its input, and the input is [x_a, c]: the condition's share
    # of each (its spectral coefficients, their product with g1, the local map, the ring means
    # and l1) is the same for every draw of one condition. prepare() computes it once per
    # condition; apply() adds it to the share of x_a. Same function as __call__ up to rounding.
    def prepare(self, c):
        """Per-condition terms of the first layers from c (B, V, Cc) (the input's channels after
        the C signal channels): ``g1`` (B, H), ``local`` (B, V, 2C), and ``l1`` (B, V, Lh)."""
        C, cg = self.C, self.c_glob
        K = self.basis.proj.shape[0]
        c_glob = c[..., : cg - C]
        coef = jnp.einsum("kv,bvi->bki", self.basis.proj[...], c_glob)              # (B, K, cg − C)
        W1 = self.g1.kernel[...].reshape(K, cg, -1)
        terms = {"g1": jnp.einsum("bki,kih->bh", coef, W1[:, C:]) + self.g1.bias[...],
                 "local": c @ self.local.kernel[...][C:] + self.local.bias[...]}
        if self.local_hidden:
            c_in = C + c.shape[-1]
            r1 = self._ring_mean(c_glob)
            Wl = self.l1.kernel[...]
            terms["l1"] = (c @ Wl[C:c_in] + r1 @ Wl[c_in + C:c_in + cg]
                           + self._ring_mean(r1) @ Wl[c_in + cg + C:] + self.l1.bias[...])
        return terms

    def apply(self, x, terms):
        """``self([x, c])`` from x (N, V, C) and :meth:`prepare`'s terms (B, …), N = n·B."""
        N, V, C = x.shape
        cg = self.c_glob
        K = self.basis.proj.shape[0]
        coef = jnp.einsum("kv,bvi->bki", self.basis.proj[...], x)                  # (N, K, C)
        W1 = self.g1.kernel[...].reshape(K, cg, -1)
        h = jax.nn.silu(_plus(jnp.einsum("bki,kih->bh", coef, W1[:, :C]), terms["g1"]))
        h = jax.nn.silu(self.g2(h))
        out = self.g3(h).reshape(N, -1, 2 * C)
        out = jnp.einsum("vk,bko->bvo", self.basis.evecs[...], out) + _plus(
            x @ self.local.kernel[...][:C], terms["local"])
        if self.local_hidden:
            c_in = self.local.kernel.shape[0]
            r1 = self._ring_mean(x)
            Wl = self.l1.kernel[...]
            pre = x @ Wl[:C] + r1 @ Wl[c_in:c_in + C] + self._ring_mean(r1) @ Wl[c_in + cg:c_in + cg + C]
            h = jax.nn.silu(_plus(pre, terms["l1"]))
            h = jax.nn.silu(self.l2(h))
            out = out + self.l3(h)
        return out


class ConditionEncoder(nnx.Module):
    """Per-vertex features e(c) (B, V, W) of the condition, computed once per pass of the flow and
    given to every coupling beside the condition itself.

    The couplings' own conditioners see the condition only through K Laplacian modes and a 2-ring
    window; the encoder lets the flow's local corrections depend on the whole measurement (a
    denoised value, an edge, the distance to the nearest observation). Architecture: the score
    network's (:class:`~geodiff.diffusion.network.DiffusionBlock`: per-vertex MLP, learned
    spectral diffusion, 1-ring differences) on [c, positional features], without a noise-level
    embedding.

    Args:
        manifold: the (possibly padded) manifold.
        condition_channels: Cc.
        width: W, features per vertex (the output width too).
        n_blocks: diffusion blocks.
        n_eig: eigenpairs of the spectral diffusion.
        n_pos: Laplacian-eigenvector positional features (:meth:`Manifold.laplacian_features`;
            at most ``max_eigenpairs − 1``).
        rngs: flax random streams.
    """

    def __init__(self, manifold: Manifold, condition_channels: int, *, width: int, n_blocks: int,
                 n_eig: int, n_pos: int, rngs: nnx.Rngs):
        geo, tau_range = net_geometry(manifold, n_eig)
        self.geo = _const_table(geo)
        n_pos = min(n_pos, manifold.max_eigenpairs - 1)
        pos = manifold.laplacian_features(n_pos) if n_pos > 0 else np.zeros((manifold.n_vertices, 0))
        self.pos = Const(jnp.asarray(pos, jnp.float32))
        self.inp = nnx.Linear(condition_channels + pos.shape[1], width, rngs=rngs)
        self.blocks = nnx.List([DiffusionBlock(width, 0, tau_range, rngs=rngs)
                                for _ in range(n_blocks)])

    def __call__(self, c):
        """c (B, V, Cc) → (B, V, W), zero on padding vertices."""
        B, V, _ = c.shape
        geo = _table_value(self.geo)
        pos = jnp.broadcast_to(self.pos[...][None], (B, *self.pos.shape))
        h = self.inp(jnp.concatenate([c, pos], axis=-1).reshape(B * V, -1)).reshape(B, V, -1)
        for block in self.blocks:
            h = block(h, None, geo)
        return h * geo.valid[None, :, None]


def soft_clip(v, bound: float | None):
    """b·tanh(v / b) (None: v unchanged): what the conditioners see with ``input_bound`` = b."""
    return v if bound is None else bound * jnp.tanh(v / bound)


class AffineCoupling(nnx.Module):
    """x_b ← x_b·e^{s(x_a, c)} + t(x_a, c) on the vertices where ``part`` is True; x_a unchanged.

    The log-scale is bounded, s = ``max_log_scale``·tanh(raw / ``max_log_scale``), and log|det| =
    Σ s over transformed, valid entries. With ``input_bound`` = b the conditioner sees
    b·tanh(x_a / b) instead of x_a (invertibility and log|det| unchanged: x_a passes through).
    """

    def __init__(self, conditioner, part, valid, *, max_log_scale: float = 2.0,
                 input_bound: float | None = None):
        self.conditioner = conditioner
        self.m = Const(jnp.asarray(np.asarray(part) & np.asarray(valid), jnp.float32)[:, None])
        self.max_log_scale = float(max_log_scale)
        self.input_bound = None if input_bound is None else float(input_bound)

    def _in(self, x_a):
        return soft_clip(x_a, self.input_bound)

    def _st(self, x_a, condition):
        x_a = self._in(x_a)
        u = x_a if condition is None else jnp.concatenate([x_a, condition], axis=-1)
        raw = self.conditioner(u)
        C = x_a.shape[-1]
        s = self.max_log_scale * jnp.tanh(raw[..., :C] / self.max_log_scale) * self.m[...]
        return s, raw[..., C:] * self.m[...]

    def _st_prepared(self, x_a, terms):
        raw = self.conditioner.apply(self._in(x_a), terms)
        C = x_a.shape[-1]
        s = self.max_log_scale * jnp.tanh(raw[..., :C] / self.max_log_scale) * self.m[...]
        return s, raw[..., C:] * self.m[...]

    def forward(self, x, condition=None, *, terms=None):
        m = self.m[...]
        s, t = (self._st(x * (1 - m), condition) if terms is None
                else self._st_prepared(x * (1 - m), terms))
        return x * (1 - m) + m * (x * jnp.exp(s) + t), jnp.sum(s, axis=(-2, -1))

    def inverse(self, y, condition=None, *, terms=None):
        m = self.m[...]
        s, t = (self._st(y * (1 - m), condition) if terms is None
                else self._st_prepared(y * (1 - m), terms))
        return y * (1 - m) + m * ((y - t) * jnp.exp(-s)), -jnp.sum(s, axis=(-2, -1))


class ConditionalRealNVP(nnx.Module):
    """A conditional normalizing flow x = G(z; c) on a manifold (docs/method.md, "The conditional
    flow").

    ``n_steps`` steps of ActNorm → coupling on partition P → coupling on its complement; P
    alternates between a spatially interleaved partition (:func:`vertex_partition`) and a fixed
    random balanced one, so information crosses every vertex pair. Couplings start as the
    identity (zero-initialized output layers), so an untrained flow is the identity map.

    Args:
        manifold: the (possibly padded) manifold; the dense conditioner pads nothing itself.
        channels: C.
        condition_channels: Cc (0 for an unconditional flow).
        n_steps: flow steps (2 couplings each; the paper used 16).
        conditioner: "spectral" (default) or "dense" (the paper's MLP on the vectorized input).
        hidden: H, hidden units of the conditioners' MLPs.
        n_eig: K, eigenpairs of the spectral conditioner.
        local_hidden: hidden units of the spectral conditioner's per-vertex MLP on 1- and 2-ring
            means (0 turns it off); see :class:`SpectralConditioner`.
        encoder_width: W of a :class:`ConditionEncoder` whose per-vertex features of the
            condition every coupling's local parts receive (0, the default: no encoder). Needs a
            condition and the spectral conditioner.
        encoder_blocks: its diffusion blocks.
        max_log_scale: bound of the couplings' log-scales.
        input_bound: b > 0 soft-clips what the conditioners see, b·tanh(v / b), for both the
            untransformed half x_a and the condition c (None: no clip). The couplings then never
            evaluate their networks outside ±b, where they were not trained: a condition or an
            intermediate draw beyond the training range cannot make them extrapolate
            (docs/amortized.md, "Out-of-range signals"). The map stays exactly invertible.
        seed: initialization seed.
    """

    def __init__(self, manifold: Manifold, *, channels: int = 1, condition_channels: int = 0,
                 n_steps: int = 8, conditioner: str = "spectral", hidden: int = 256, n_eig: int = 64,
                 local_hidden: int = 0, encoder_width: int = 0, encoder_blocks: int = 2,
                 max_log_scale: float = 2.0, input_bound: float | None = None, seed: int = 0):
        if conditioner not in ("spectral", "dense"):
            raise ValueError(f"conditioner must be 'spectral' or 'dense', got {conditioner!r}")
        for name, val in (("channels", channels), ("n_steps", n_steps), ("hidden", hidden)):
            if not isinstance(val, (int, np.integer)) or val < 1:
                raise ValueError(f"{name} must be a positive integer, got {val!r}")
        if not isinstance(local_hidden, (int, np.integer)) or local_hidden < 0:
            raise ValueError(f"local_hidden must be an integer ≥ 0, got {local_hidden!r}")
        if not isinstance(condition_channels, (int, np.integer)) or condition_channels < 0:
            raise ValueError(f"condition_channels must be an integer ≥ 0, got {condition_channels!r}")
        for name, val in (("encoder_width", encoder_width), ("encoder_blocks", encoder_blocks)):
            if not isinstance(val, (int, np.integer)) or isinstance(val, bool) or val < 0:
                raise ValueError(f"{name} must be an integer ≥ 0, got {val!r}")
        if encoder_width and (condition_channels == 0 or conditioner != "spectral"):
            raise ValueError("encoder_width > 0 needs a conditional flow (condition_channels > 0) "
                             f"with conditioner='spectral', got condition_channels="
                             f"{condition_channels}, conditioner={conditioner!r}")
        if input_bound is not None and not (isinstance(input_bound, (int, float, np.floating))
                                            and not isinstance(input_bound, bool)
                                            and math.isfinite(input_bound) and input_bound > 0):
            raise ValueError(f"input_bound must be None or a finite number > 0, got {input_bound!r}")
        self.input_bound = None if input_bound is None else float(input_bound)
        rngs = nnx.Rngs(seed)
        V = manifold.n_vertices
        self.n_vertices, self.channels, self.condition_channels = V, channels, condition_channels
        self.encoder_width = int(encoder_width)
        #: the constructor's settings (what a saved sampler needs to rebuild this flow)
        self.config = (("n_steps", int(n_steps)), ("conditioner", conditioner), ("hidden", int(hidden)),
                       ("n_eig", int(n_eig)), ("local_hidden", int(local_hidden)),
                       ("encoder_width", int(encoder_width)), ("encoder_blocks", int(encoder_blocks)),
                       ("max_log_scale", float(max_log_scale)), ("input_bound", self.input_bound),
                       ("seed", int(seed)))
        valid = np.asarray(manifold.valid)
        spatial = vertex_partition(manifold)
        rand = np.zeros(V, dtype=bool)
        rand[np.random.default_rng(seed).permutation(np.flatnonzero(valid))[: int(valid.sum()) // 2]] = True
        self.encoder = (ConditionEncoder(manifold, condition_channels, width=int(encoder_width),
                                         n_blocks=int(encoder_blocks), n_eig=n_eig, n_pos=16,
                                         rngs=rngs) if encoder_width else None)
        if conditioner == "spectral":
            evals, evecs = manifold.eigenpairs(min(n_eig, manifold.max_eigenpairs))
            ring = ring_table(manifold.laplacian, valid) if local_hidden else None
            basis = SpectralBasis(evecs, manifold.mass, ring)     # one copy for every coupling
            make = lambda: SpectralConditioner(basis, None, channels,  # noqa: E731
                                               condition_channels + int(encoder_width),
                                               hidden=hidden, rngs=rngs,
                                               local_hidden=local_hidden,
                                               global_channels=channels + condition_channels)
        else:
            make = lambda: DenseConditioner(V, channels, condition_channels, hidden=hidden, rngs=rngs)  # noqa: E731
        layers = []
        for k in range(n_steps):
            part = spatial if k % 2 == 0 else rand
            layers.append(ActNorm(V, channels, valid))
            layers.append(AffineCoupling(make(), part, valid, max_log_scale=max_log_scale,
                                         input_bound=input_bound))
            layers.append(AffineCoupling(make(), ~part, valid, max_log_scale=max_log_scale,
                                         input_bound=input_bound))
        self.layers = nnx.List(layers)
        self.valid = Const(jnp.asarray(valid, jnp.float32)[:, None])

    def _check(self, x, condition, name):
        if x.ndim != 3 or x.shape[1:] != (self.n_vertices, self.channels):
            raise ValueError(f"{name} must have shape (B, {self.n_vertices}, {self.channels}), got {x.shape}")
        if self.condition_channels == 0:
            if condition is not None:
                raise ValueError("this flow is unconditional (condition_channels=0): pass condition=None")
        elif condition is None or condition.shape != (x.shape[0], self.n_vertices, self.condition_channels):
            raise ValueError(f"condition must have shape ({x.shape[0]}, {self.n_vertices}, "
                             f"{self.condition_channels}), got {getattr(condition, 'shape', None)}")

    def encode(self, condition):
        """The conditioning every coupling receives: c itself, or [c, e(c)] (B, V, Cc + W) with
        a :class:`ConditionEncoder`. Pass it to :meth:`forward` / :meth:`inverse` with
        ``encoded=True`` to evaluate the encoder once for many draws of the same condition."""
        if condition is not None:
            condition = soft_clip(condition, self.input_bound)
        if condition is None or self.encoder is None:
            return condition
        return jnp.concatenate([condition, self.encoder(condition)], axis=-1)

    def _prepare(self, x, condition, name, encoded):
        if encoded and self.encoder is not None:
            cc, w = self.condition_channels, self.encoder_width
            if condition is None or condition.shape[-1] != cc + w:
                raise ValueError(f"an encoded condition must have condition_channels + "
                                 f"encoder_width = {cc + w} channels, got shape "
                                 f"{getattr(condition, 'shape', None)}")
            self._check(x, condition[..., :cc], name)
            return condition
        self._check(x, condition, name)
        return condition if encoded else self.encode(condition)   # encode() once, not twice

    def prepare(self, condition, *, encoded: bool = False) -> list:
        """What every coupling computes from the condition alone, once per condition: a list
        (one entry per layer, None for ActNorm) of (B, …) arrays. Pass it to :meth:`forward` /
        :meth:`inverse` as ``prepared=`` with n·B signals (row s·B + b belongs to condition b)
        to draw n samples per condition without recomputing the condition's share of the
        conditioners' first layers for each draw (on the 46×90 sphere that share is most of a
        coupling's FLOPs: 4 of its 5 input channels). Same function up to float rounding.

        Args:
            condition: (B, V, Cc), or :meth:`encode`'s output with ``encoded=True``.
        """
        if self.condition_channels == 0:
            raise ValueError("this flow is unconditional (condition_channels=0): nothing to prepare")
        c = self._prepare(jnp.zeros((condition.shape[0], self.n_vertices, self.channels)),
                          condition, "z", encoded)
        return [layer.conditioner.prepare(c) if isinstance(layer, AffineCoupling) else None
                for layer in self.layers]

    def _check_prepared(self, x, prepared, name):
        if x.ndim != 3 or x.shape[1:] != (self.n_vertices, self.channels):
            raise ValueError(f"{name} must have shape (N, {self.n_vertices}, {self.channels}), got {x.shape}")
        if not isinstance(prepared, list) or len(prepared) != len(self.layers):
            raise ValueError(f"prepared must be this flow's prepare() output ({len(self.layers)} "
                             "entries)")
        B = jax.tree.leaves(prepared)[0].shape[0]
        if x.shape[0] % B:
            raise ValueError(f"{name} must have n·B rows for the B = {B} prepared conditions, got "
                             f"{x.shape[0]}")

    def forward(self, z, condition=None, *, encoded: bool = False, prepared=None):
        """x = G(z; c) and log|det ∂x/∂z|: (B, V, C) → ((B, V, C), (B,)).

        ``encoded=True``: ``condition`` is already :meth:`encode`'s output. ``prepared``
        (:meth:`prepare`'s output for B conditions) replaces ``condition``; z then has n·B rows."""
        if prepared is not None:
            self._check_prepared(z, prepared, "z")
        else:
            condition = self._prepare(z, condition, "z", encoded)
        logdet = jnp.zeros(z.shape[0], z.dtype)
        for i, layer in enumerate(self.layers):
            if prepared is not None and isinstance(layer, AffineCoupling):
                z, ld = layer.forward(z, terms=prepared[i])
            else:
                z, ld = layer.forward(z, condition)
            logdet = logdet + ld
        return z, logdet

    def inverse(self, x, condition=None, *, encoded: bool = False, prepared=None):
        """z = G⁻¹(x; c) and log|det ∂z/∂x|: (B, V, C) → ((B, V, C), (B,)).

        ``encoded=True``: ``condition`` is already :meth:`encode`'s output. ``prepared`` as in
        :meth:`forward`."""
        if prepared is not None:
            self._check_prepared(x, prepared, "x")
        else:
            condition = self._prepare(x, condition, "x", encoded)
        logdet = jnp.zeros(x.shape[0], x.dtype)
        for i in reversed(range(len(self.layers))):
            layer = self.layers[i]
            if prepared is not None and isinstance(layer, AffineCoupling):
                x, ld = layer.inverse(x, terms=prepared[i])
            else:
                x, ld = layer.inverse(x, condition)
            logdet = logdet + ld
        return x, logdet

    def log_prob(self, x, condition=None, *, encoded: bool = False):
        """Exact log q(x | c) = log N(G⁻¹(x); 0, I) + log|det ∂G⁻¹/∂x| over valid entries, (B,)."""
        z, logdet = self.inverse(x, condition, encoded=encoded)
        w = self.valid[...]
        d = jnp.sum(w) * self.channels
        return -0.5 * jnp.sum(w * z**2, axis=(-2, -1)) - 0.5 * d * math.log(2 * math.pi) + logdet

    def sample(self, key, condition=None, n: int = 1):
        """n draws x = G(z; c), z ~ N(0, I) on valid entries (zeros on padding): (n, V, C), or
        (n, B, V, C) for a batch of conditions (B, V, Cc)."""
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if condition is None:
            z = jax.random.normal(key, (n, self.n_vertices, self.channels)) * self.valid[...]
            return self.forward(z)[0]
        B = condition.shape[0]
        self._check(jnp.zeros((B, self.n_vertices, self.channels)), condition, "z")
        prepared = self.prepare(condition)            # once per condition, not per draw
        z = jax.random.normal(key, (n * B, self.n_vertices, self.channels)) * self.valid[...]
        return self.forward(z, prepared=prepared)[0].reshape(n, B, self.n_vertices, self.channels)
