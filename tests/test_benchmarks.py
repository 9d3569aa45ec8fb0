"""Smoke runs of the benchmark scripts (tiny settings) and their output schema (API.md)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {"task", "method", "time_per_sample_s", "psnr", "ssim", "mse", "coverage90",
            "training_s", "break_even_n"}


sys.path.insert(0, str(ROOT / "benchmarks"))  # scripts import their siblings


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_era5_imputation_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("GEODIFF_CACHE", str(tmp_path / "cache"))
    script = load_script("era5_imputation")
    result = script.main(["--smoke", "--out", str(tmp_path / "out"), "--json", str(tmp_path / "r.json")])
    on_disk = json.loads((tmp_path / "r.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert {"seed", "data_source", "machine", "versions"} <= set(on_disk["meta"])
    assert "ERA5-like (GloSea4-anchored)" in on_disk["meta"]["data_source"]
    methods = {r["method"] for r in on_disk["rows"]}
    assert methods == {"Kriging", "Harmonic", "DPS", "APS(1)", "APS(128)"}
    for row in on_disk["rows"]:
        assert ROW_KEYS <= set(row)
        assert row["time_per_sample_s"] > 0 and 0 < row["ssim"] <= 1
    for row in on_disk["rows"][:2]:
        assert 10 < row["psnr"] < 60
    assert set(on_disk["meta"]["dps"]["zeta_psnr_on_validation"]) == {"0.1", "0.3"}
    by = {r["method"]: r for r in on_disk["rows"]}
    # a Gaussian fitted to (even 200) ERA5-like fields beats Laplacian interpolation on real fields
    assert by["Kriging"]["psnr"] > by["Harmonic"]["psnr"]
    aps = by["APS(128)"]
    assert 0 <= aps["coverage90"] <= 1 and aps["training_s"] > 0 and 10 < aps["psnr"] < 60
    assert by["APS(1)"]["time_per_sample_s"] > 0 and by["APS(1)"]["coverage90"] is None
    for name in ["results.json", "results.md", "globe.png"]:
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_geometry_build_smoke(tmp_path):
    script = load_script("geometry_build")
    result = script.main(["--smoke", "--json", str(tmp_path / "g.json")])
    rows = {r["manifold"]: r for r in result["rows"]}
    assert rows["Sphere.latlon(46, 90)"]["n_vertices"] == 4140
    assert rows["Mesh.bunny(3)"]["n_vertices"] == 1887
    for r in rows.values():
        assert r["cold_s"] > 0 and r["cached_s"] > 0
    assert json.loads((tmp_path / "g.json").read_text())["rows"] == json.loads(json.dumps(result["rows"]))


@pytest.mark.slow
def test_train_priors_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("GEODIFF_CACHE", str(tmp_path / "cache"))
    script = load_script("train_priors")
    result = script.main(["--smoke", "--dataset", "all", "--no-progress", "--out", str(tmp_path / "figs"),
                          "--json", str(tmp_path / "p.json")])
    rows = {r["dataset"]: r for r in result["rows"]}
    assert set(rows) == {"era5", "bunny", "mnist"}
    for name, r in rows.items():
        assert r["trained_now"] and r["steps"] == 4 and r["step_s"] > 0 and r["n_params"] > 0
        assert (tmp_path / "figs" / f"{name}-smoke.png").stat().st_size > 0
        assert (tmp_path / "cache" / "priors" / f"{name}-smoke.npz").exists()
    # a second call reuses the cached priors instead of training again
    again = script.main(["--smoke", "--dataset", "mnist", "--no-progress", "--out", str(tmp_path / "figs")])
    assert again["rows"][0]["trained_now"] is False


def test_prior_step_time_smoke(tmp_path):
    result = load_script("prior_step_time").main(["--smoke", "--json", str(tmp_path / "s.json")])
    assert {r["manifold"] for r in result["rows"]} == {"sphere 46x90", "bunny res3", "grid 32x32"}
    assert all(r["step_s"] > 0 and r["compile_s"] > 0 for r in result["rows"])


@pytest.mark.slow
def test_gaussian_posterior_smoke(tmp_path):
    script = load_script("gaussian_posterior")
    result = script.main(["--smoke", "--priors", "mixture", "--out", str(tmp_path / "out"),
                          "--json", str(tmp_path / "r.json")])
    on_disk = json.loads((tmp_path / "r.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert {"seed", "data_source", "machine", "versions", "matmul_peak_gflops"} <= set(on_disk["meta"])
    assert {(r["method"], r["prior_term"]) for r in on_disk["rows"]} == {
        (m, t) for m in ("APS(1)", "APS(128)") for t in ("exact", "elbo")}
    for row in on_disk["rows"]:
        assert ROW_KEYS <= set(row) and row["time_per_sample_s"] > 0
    for run in on_disk["runs"]:
        for stage in [run["base"], *run["curve"]]:
            assert 0 <= stage["rel_err"] < 2 and 0.3 < stage["std_ratio"] < 3
            assert 0.5 < stage["coverage90"] <= 1 and 0 <= stage["between_modes"] <= 1
        assert run["steps"] >= 1 and run["flops_128"] > run["flops_1"] > 0
    assert (tmp_path / "out" / "results.md").stat().st_size > 0
