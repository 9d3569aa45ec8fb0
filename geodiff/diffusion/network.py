"""A geometry-aware score network that runs unchanged on grids, spheres and meshes.

DiffusionNet-style blocks (Sharp et al. 2022): each block mixes channels per vertex with a small MLP
and spreads information over the surface by a learned *spectral diffusion*
``Φ diag(exp(−λ_k τ_c)) Φᵀ M h`` per channel c, with τ_c ≥ 0 learned (global, smooth), plus a
1-ring neighbour difference (local, sharp: strokes of digits, coastlines) gathered from a
fixed-shape neighbour table built from the Laplacian's sparsity. The noise level enters by
FiLM (scale and shift per block). Per-vertex inputs: the preconditioned noisy signal and fixed
positional features (Laplacian eigenvectors, the data's per-vertex mean and std), so location-bound
structure (land and sea, a digit's position) can be learned. Nothing in the network depends on the
manifold type: geometry arrives as fixed-shape arrays (:class:`NetGeometry`).

Dimension letters: B batch, V vertices, C channels, F features, K eigenpairs, W width, E embedding.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx


class RingTable(NamedTuple):
    """A fixed-shape weighted 1-ring (:func:`ring_table`), with its transpose for the backward pass.

    Attributes:
        index: (V, J) indices of up to J neighbours per vertex (padded with the vertex itself).
        weight: (V, J) their weights, summing to 1 per real vertex (0 on padded entries).
        t_index, t_weight: (V, J) the transpose: for each vertex u the vertices v that read it and
            the weights w_vu, for the vertices read by at most J others (0 weights elsewhere).
        hub: (H,) the vertices read by more than J others (the poles of a lat-lon sphere, some
            mesh vertices; H = 0 on grids).
        hub_index, hub_weight: (H, Jh) their readers and weights.
        csr_data, csr_indices, csr_indptr: the same operator A (V, V) in compressed sparse rows
            (nnz,) float32, (nnz,) int32, (V + 1,) int32, its zero-weight slots dropped.
        csr_t_data, csr_t_indices, csr_t_indptr: its transpose Aᵀ in compressed sparse rows.
    """

    index: jax.Array
    weight: jax.Array
    t_index: jax.Array
    t_weight: jax.Array
    hub: jax.Array
    hub_index: jax.Array
    hub_weight: jax.Array
    csr_data: jax.Array
    csr_indices: jax.Array
    csr_indptr: jax.Array
    csr_t_data: jax.Array
    csr_t_indices: jax.Array
    csr_t_indptr: jax.Array


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["evecs", "proj", "evals", "valid", "ring"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class NetGeometry:
    """Constant geometry the network uses (a pytree of fixed-shape arrays).

    Attributes:
        evecs: (V, K) Laplacian eigenvectors Φ (zero rows on padding).
        proj: (K, V) the projection Φᵀ M (mass-weighted; zero columns on padding).
        evals: (K,) eigenvalues.
        valid: (V,) 1.0 on real vertices, 0.0 on padding.
        ring: the 1-ring neighbour table (:class:`RingTable`).
    """

    evecs: jax.Array
    proj: jax.Array
    evals: jax.Array
    valid: jax.Array
    ring: RingTable


def neighbour_table(laplacian, valid, max_neighbours: int = 8):
    """Fixed-shape neighbour lists from a sparse Laplacian: for each vertex the (up to) J
    off-diagonal entries of largest |L_ij|, weighted ∝ |L_ij| and normalized to sum 1.

    Gathering with this table is a local averaging operator (a 1-ring mean with geometric
    weights) that costs O(V J) and needs no sparse matrix inside JAX.

    Args:
        laplacian: (V, V) scipy sparse matrix.
        valid: (V,) bool.
        max_neighbours: J.

    Returns:
        index (V, J) int32, weight (V, J) float32.
    """
    import numpy as np
    import scipy.sparse as sp

    L = sp.csr_matrix(laplacian)
    V = L.shape[0]
    index = np.tile(np.arange(V, dtype=np.int32)[:, None], (1, max_neighbours))
    weight = np.zeros((V, max_neighbours), np.float32)
    for v in range(V):
        cols = L.indices[L.indptr[v]:L.indptr[v + 1]]
        vals = np.abs(L.data[L.indptr[v]:L.indptr[v + 1]])
        keep = (cols != v) & (vals > 0)
        cols, vals = cols[keep], vals[keep]
        if len(cols) == 0 or not valid[v]:
            continue
        top = np.argsort(-vals, kind="stable")[:max_neighbours]
        index[v, : len(top)] = cols[top]
        weight[v, : len(top)] = vals[top] / vals[top].sum()
    return index, weight


def fourier_embedding(x, dim: int):
    """(...,) → (..., dim) sin/cos features of x at geometric frequencies 1/16 … 16."""
    freqs = jnp.exp(jnp.linspace(math.log(1 / 16), math.log(16), dim // 2))
    arg = x[..., None] * freqs
    return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1)


def ring_table(laplacian, valid, max_neighbours: int = 8) -> RingTable:
    """:func:`neighbour_table` and its transpose, as a :class:`RingTable` of jax arrays.

    Args:
        laplacian: (V, V) scipy sparse matrix; valid: (V,) bool; max_neighbours: J.

    Returns:
        RingTable with index, weight, t_index, t_weight (V, J), hub (H,), hub_index and
        hub_weight (H, max(1, largest hub in-degree)), and the operator and its transpose in
        compressed sparse rows. Built once per geometry, in O(V J).
    """
    import numpy as np

    index, weight = neighbour_table(laplacian, valid, max_neighbours)
    V, J = index.shape
    v_of, j_of = np.nonzero(weight > 0)
    u_of = index[v_of, j_of]
    order = np.argsort(u_of, kind="stable")
    v_of, u_of, w_of = v_of[order], u_of[order], weight[v_of, j_of][order]
    degree = np.bincount(u_of, minlength=V)
    slot = np.arange(len(u_of)) - np.concatenate([[0], np.cumsum(degree)[:-1]])[u_of]
    hub = np.flatnonzero(degree > J).astype(np.int32)
    is_hub = degree[u_of] > J
    t_index = np.tile(np.arange(V, dtype=np.int32)[:, None], (1, J))
    t_weight = np.zeros((V, J), np.float32)
    t_index[u_of[~is_hub], slot[~is_hub]] = v_of[~is_hub]
    t_weight[u_of[~is_hub], slot[~is_hub]] = w_of[~is_hub]
    jh = max(int(degree[hub].max()) if len(hub) else 0, 1)
    row = np.searchsorted(hub, u_of[is_hub])
    hub_index = np.tile(hub[:, None], (1, jh)).astype(np.int32)
    hub_weight = np.zeros((len(hub), jh), np.float32)
    hub_index[row, slot[is_hub]] = v_of[is_hub]
    hub_weight[row, slot[is_hub]] = w_of[is_hub]
    import scipy.sparse as sp

    A = sp.csr_matrix((weight.ravel(), (np.repeat(np.arange(V), J), index.ravel())), shape=(V, V))
    A.eliminate_zeros()
    A.sort_indices()
    At = A.T.tocsr()
    At.sort_indices()
    csr = [(M.data.astype(np.float32), M.indices.astype(np.int32), M.indptr.astype(np.int32))
           for M in (A, At)]
    return RingTable(*(jnp.asarray(a) for a in (index, weight, t_index, t_weight, hub, hub_index,
                                                 hub_weight, *csr[0], *csr[1])))


def _gather_sum(h, index, weight):
    acc = jnp.zeros_like(h)
    for j in range(index.shape[1]):
        acc = acc + h[:, index[:, j]] * weight[None, :, j, None]
    return acc


#: :func:`ring_mean` multiplies by the sparse matrix instead of gathering per neighbour slot
#: when h (B, V, W) has fewer than ``_CSR_MAX_WIDTH`` channels and at least ``_CSR_MIN_COLUMNS``
#: columns B·W (``benchmarks/ring_mean_cost.py``, docs/amortized.md): XLA's CPU gather of one
#: scalar per (b, v) is slow, while the sparse product needs h transposed to (V, B·W), which
#: costs more than it saves for wide activations (the score network's W = 32) and tiny batches.
_CSR_MAX_WIDTH = 8
_CSR_MIN_COLUMNS = 16


def _csr_product(data, indices, indptr, h):
    """Σ_u A_vu h[b, u, w] for A (V, V) in compressed sparse rows and h (B, V, W)."""
    from jax.experimental import sparse as jsparse

    B, V, W = h.shape
    A = jsparse.BCSR((data.astype(h.dtype), indices, indptr), shape=(V, V))
    out = A @ jnp.moveaxis(h, 1, 0).reshape(V, B * W)
    return jnp.moveaxis(out.reshape(V, B, W), 0, 1)


def _ring_product(table: RingTable, h, transpose: bool):
    """A h (``transpose`` False) or Aᵀ h (True) for h (B, V, W), by slot gathers or by the
    sparse product (module constants above)."""
    B, V, W = h.shape
    if W < _CSR_MAX_WIDTH and B * W >= _CSR_MIN_COLUMNS:
        if transpose:
            return _csr_product(table.csr_t_data, table.csr_t_indices, table.csr_t_indptr, h)
        return _csr_product(table.csr_data, table.csr_indices, table.csr_indptr, h)
    if not transpose:
        return _gather_sum(h, table.index, table.weight)
    out = _gather_sum(h, table.t_index, table.t_weight)
    if table.hub.shape[0]:
        hub_sum = jnp.einsum("bhjw,hj->bhw", h[:, table.hub_index], table.hub_weight)
        out = out.at[:, table.hub].add(hub_sum)
    return out


def _batched_product(transpose: bool):
    """:func:`_ring_product` whose batching rule folds the mapped axis into B, so a ``vmap``
    (over a sampler's draws) sees the whole batch when it picks the path."""

    @jax.custom_batching.custom_vmap
    def apply(table, h):
        return _ring_product(table, h, transpose)

    @apply.def_vmap
    def _rule(axis_size, in_batched, table, h):
        if any(jax.tree.leaves(in_batched[0])):
            raise NotImplementedError("ring_mean: the neighbour table cannot be batched")
        if not in_batched[1]:
            return apply(table, h), False
        n, B = h.shape[:2]
        out = apply(table, h.reshape((n * B,) + h.shape[2:]))
        return out.reshape((n, B) + out.shape[1:]), True

    return apply


_apply_a, _apply_at = _batched_product(False), _batched_product(True)


@jax.custom_vjp
def ring_mean(h, table: RingTable):
    """Weighted 1-ring mean Σ_j w_vj h[:, idx_vj], (B, V, W) → (B, V, W), with a :class:`RingTable`.

    Narrow activations with many columns (a flow's samples, W ≤ 7 and B·W ≥ 16) are multiplied
    by the operator in compressed sparse rows; otherwise one gather per neighbour slot is
    accumulated, so the (B, V, J, W) block of all neighbours (J times the activations) is never
    built. The backward pass applies the transpose the same way (the transposed table or the
    transposed sparse matrix) instead of letting autodiff scatter-add, which is slow on CPU: the
    score network's train step on the 46×90 sphere went from 1.21–1.41 to 0.90 s at batch 64
    (``benchmarks/prior_step_time.py``, docs/priors.md). Reverse mode only, to any order (a
    ``jax.custom_vjp`` whose backward pass is :func:`ring_mean_transpose`: ``jax.jvp`` /
    ``jacfwd`` through it raise; use ``vjp`` / ``jacrev``), and not differentiable with respect
    to the table.
    """
    return _apply_a(table, h)


def _ring_mean_fwd(h, table):
    return ring_mean(h, table), table


def _ring_mean_bwd(table, g):
    return ring_mean_transpose(g, table), None


ring_mean.defvjp(_ring_mean_fwd, _ring_mean_bwd)


@jax.custom_vjp
def ring_mean_transpose(g, table: RingTable):
    """Aᵀ g for the ring-mean operator A of :func:`ring_mean`, (B, V, W) → (B, V, W); its own
    backward pass is :func:`ring_mean`."""
    return _apply_at(table, g)


def _ring_mean_t_fwd(g, table):
    return ring_mean_transpose(g, table), table


def _ring_mean_t_bwd(table, h):
    return ring_mean(h, table), None


ring_mean_transpose.defvjp(_ring_mean_t_fwd, _ring_mean_t_bwd)


def neighbour_mean(h, geo: NetGeometry):
    """:func:`ring_mean` with the neighbour table of a :class:`NetGeometry`."""
    return ring_mean(h, geo.ring)


def net_geometry(manifold, n_eig: int) -> tuple[NetGeometry, tuple[float, float]]:
    """The :class:`NetGeometry` of a manifold with its first ``n_eig`` eigenpairs (capped at
    ``manifold.max_eigenpairs``), and an initial range of diffusion times (0.1/λ_K, 2/λ_1) in
    units of 1/eigenvalue: from below the finest mode to the coarsest."""
    import numpy as np

    k = min(n_eig, manifold.max_eigenpairs)
    evals, evecs = manifold.eigenpairs(k)
    geo = NetGeometry(evecs=jnp.asarray(evecs, jnp.float32),
                      proj=jnp.asarray((evecs * np.asarray(manifold.mass)[:, None]).T, jnp.float32),
                      evals=jnp.asarray(evals, jnp.float32),
                      valid=jnp.asarray(manifold.valid, jnp.float32),
                      ring=ring_table(manifold.laplacian, manifold.valid))
    lam1, lamk = max(float(evals[1]) if k > 1 else 1.0, 1e-6), max(float(evals[-1]), 1e-6)
    return geo, (0.1 / lamk, 2.0 / lam1)


class DiffusionBlock(nnx.Module):
    """h ← h + MLP([h, Φ e^{−Λτ} Φᵀ M h, 1-ring mean(h) − h]), per vertex, (B, V, W) → (B, V, W).

    ``emb`` > 0 adds FiLM by an embedding (B, E) (the noise level in the score network); with
    ``emb=0`` the block takes none (``emb=None`` in the call).
    """

    def __init__(self, width: int, emb: int, tau_range: tuple[float, float], *, rngs: nnx.Rngs):
        lo, hi = tau_range
        self.log_tau = nnx.Param(jnp.linspace(math.log(lo), math.log(hi), width))
        self.film = (nnx.Linear(emb, 2 * width, rngs=rngs, kernel_init=nnx.initializers.zeros)
                     if emb else None)
        self.lin1 = nnx.Linear(3 * width, width, rngs=rngs)
        self.lin2 = nnx.Linear(width, width, rngs=rngs)

    def __call__(self, h, emb, geo: NetGeometry):
        B, V, W = h.shape
        coef = jnp.einsum("kv,bvw->bkw", geo.proj, h)
        decay = jnp.exp(-geo.evals[:, None] * jnp.exp(self.log_tau[...])[None, :])
        h_diff = jnp.einsum("vk,bkw->bvw", geo.evecs, coef * decay)
        h_nbr = neighbour_mean(h, geo) - h
        z = self.lin1(jnp.concatenate([h, h_diff, h_nbr], axis=-1).reshape(B * V, 3 * W)).reshape(B, V, W)
        if self.film is not None:
            scale, shift = jnp.split(self.film(emb), 2, axis=-1)  # (B, W) each
            z = z * (1 + scale[:, None]) + shift[:, None]
        z = jax.nn.silu(z)
        z = self.lin2(z.reshape(B * V, W)).reshape(B, V, W)
        return h + z


class SpectralScoreNet(nnx.Module):
    """F(x_in, log λ) → (B, V, C): the preconditioned network inside :class:`DiffusionPrior`.

    Args:
        channels: C, signal channels.
        n_features: F, per-vertex positional features.
        width: W, hidden channels per vertex.
        n_blocks: number of blocks.
        emb_dim: E, noise-level embedding size.
        tau_range: initial range (min, max) of the learned diffusion times, in units of
            1/eigenvalue (set from the manifold's spectrum by the caller).
        rngs: flax random streams.
    """

    def __init__(self, *, channels: int, n_features: int, width: int = 32, n_blocks: int = 4,
                 emb_dim: int = 32, tau_range: tuple[float, float] = (1e-3, 1.0), rngs: nnx.Rngs):
        self.emb_dim = emb_dim
        self.inp = nnx.Linear(channels + n_features, width, rngs=rngs)
        self.emb1 = nnx.Linear(emb_dim, emb_dim, rngs=rngs)
        self.emb2 = nnx.Linear(emb_dim, emb_dim, rngs=rngs)
        self.blocks = nnx.List([DiffusionBlock(width, emb_dim, tau_range, rngs=rngs) for _ in range(n_blocks)])
        self.out = nnx.Linear(width, channels, rngs=rngs, kernel_init=nnx.initializers.zeros)

    def __call__(self, x_in, log_lam, features, geo: NetGeometry):
        """Args: x_in (B, V, C); log_lam (B,); features (V, F); geo. Returns (B, V, C)."""
        B, V, C = x_in.shape
        feats = jnp.broadcast_to(features[None], (B, *features.shape))
        h = self.inp(jnp.concatenate([x_in, feats], axis=-1).reshape(B * V, -1)).reshape(B, V, -1)
        emb = jax.nn.silu(self.emb1(fourier_embedding(log_lam, self.emb_dim)))
        emb = jax.nn.silu(self.emb2(emb))
        for block in self.blocks:
            h = block(h, emb, geo)
        out = self.out(h.reshape(B * V, -1)).reshape(B, V, C)
        return out * geo.valid[None, :, None]
