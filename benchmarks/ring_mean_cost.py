"""What the 1-ring mean costs by each of its two paths (issue "Throughput": the ring gathers).

``geodiff.diffusion.network.ring_mean`` applies the fixed ring-mean operator A (V×V, ≤ 8
neighbours a row) to activations h (B, V, W) either by one gather per neighbour slot or by a
compressed-sparse-row product on h transposed to (V, B·W); its backward pass applies Aᵀ the same
way. This script times both paths, forward and forward + backward (a VJP), on the benchmark
manifolds, for the shapes the package meets: a flow's samples (W = 1; B = 128 draws of one
measurement, 2,048 of a batch of 16 measurements), a flow's condition (W = 3) and the score
network's activations (W = 32, B = 1 and 64). The rule ``ring_mean`` follows (the sparse product
when W < 8 and B·W ≥ 16) was chosen from a run on shared cores; ``docs/results.md`` has the
table measured alone on the cores and what it says about the rule.
Compilation is excluded; median of repeats. Run it with nothing else on the machine.

    python benchmarks/ring_mean_cost.py            # ≈ 1 min on 2 CPU cores
    python benchmarks/ring_mean_cost.py --smoke    # what the tests run

Prints a table and writes ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from geodiff import Grid, Mesh, Sphere
from geodiff.diffusion import network
from geodiff.timing import machine_info, time_call, versions, write_json

MANIFOLDS = {"sphere 46×90": lambda: Sphere.latlon(46, 90), "bunny res3": lambda: Mesh.bunny(3),
             "grid 32×32": lambda: Grid(32, 32)}
SHAPES = [(1, 1), (8, 1), (16, 1), (128, 1), (512, 1), (2048, 1), (4096, 1),
          (1, 3), (32, 3), (1, 32), (64, 32)]


def _paths(table):
    """{path: (A h, Aᵀ g)} for both ways of applying the operator, forced."""
    def csr(h, transpose):
        names = ("csr_t_data", "csr_t_indices", "csr_t_indptr") if transpose else \
            ("csr_data", "csr_indices", "csr_indptr")
        return network._csr_product(*(getattr(table, n) for n in names), h)

    def gather(h, transpose):
        if not transpose:
            return network._gather_sum(h, table.index, table.weight)
        out = network._gather_sum(h, table.t_index, table.t_weight)
        if table.hub.shape[0]:
            hub = jnp.einsum("bhjw,hj->bhw", h[:, table.hub_index], table.hub_weight)
            out = out.at[:, table.hub].add(hub)
        return out

    return {"gather": gather, "sparse": csr}


def run(*, smoke: bool, repeats: int) -> list[dict]:
    rows = []
    manifolds = {"grid 8×8": lambda: Grid(8, 8)} if smoke else MANIFOLDS
    shapes = [(1, 1), (16, 1), (2, 32)] if smoke else SHAPES
    for name, build in manifolds.items():
        m = build()
        table = network.ring_table(m.laplacian, np.asarray(m.valid))
        for B, W in shapes:
            h = jax.random.normal(jax.random.key(0), (B, m.n_vertices, W), jnp.float32)
            row = {"manifold": name, "n_vertices": m.n_vertices, "B": B, "W": W,
                   "chosen": ("sparse" if W < network._CSR_MAX_WIDTH
                              and B * W >= network._CSR_MIN_COLUMNS else "gather")}
            out = {}
            for path, apply in _paths(table).items():
                fwd = jax.jit(lambda h, f=apply: f(h, False))
                both = jax.jit(lambda h, f=apply: (f(h, False), f(h, True)))
                row[f"{path}_fwd_ms"] = 1e3 * time_call(fwd, h, repeats=repeats)[0]
                row[f"{path}_fwd_bwd_ms"], out[path] = time_call(both, h, repeats=repeats)
                row[f"{path}_fwd_bwd_ms"] *= 1e3
            # the two paths apply the same operator (float32, summed in another order)
            row["max_abs_diff"] = max(float(jnp.max(jnp.abs(a - b)))
                                      for a, b in zip(out["gather"], out["sparse"]))
            rows.append(row)
            print(_line(row))
    return rows


def _line(r: dict) -> str:
    return (f"| {r['manifold']} | {r['B']} | {r['W']} | {r['gather_fwd_ms']:.3f} | "
            f"{r['sparse_fwd_ms']:.3f} | {r['gather_fwd_bwd_ms']:.3f} | "
            f"{r['sparse_fwd_bwd_ms']:.3f} | {r['chosen']} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="one small grid, three shapes (CI)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per entry (default 20)")
    p.add_argument("--out", type=Path, default=Path("outputs/ring_mean_cost"))
    args = p.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (2 if args.smoke else 20)
    if repeats < 1:
        raise SystemExit(f"--repeats must be ≥ 1, got {repeats}")
    print("| manifold | B | W | gather A h (ms) | sparse A h (ms) | gather A h + Aᵀ g (ms) | "
          "sparse A h + Aᵀ g (ms) | ring_mean takes |\n|---|---|---|---|---|---|---|---|")
    rows = run(smoke=args.smoke, repeats=repeats)
    result = {"meta": {"smoke": args.smoke, "repeats": repeats, "machine": machine_info(),
                       "versions": versions(), "dtype": "float32",
                       "rule": f"sparse when W < {network._CSR_MAX_WIDTH} and B·W ≥ "
                               f"{network._CSR_MIN_COLUMNS}"},
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", result)
    return result


if __name__ == "__main__":
    main()
