"""Smoke runs of the benchmark scripts (tiny settings) and their output schema (API.md)."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import jax
import numpy as np
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


@pytest.fixture
def xla_optimized():
    """The smokes on the 46×90 sphere run at real size: XLA's optimizations pay for themselves
    there (ERA5-like smoke: 97 s optimized, 118 s not), unlike elsewhere (tests/conftest.py)."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory):
    """One cache for the comparison smoke runs, so each smoke prior is trained once."""
    return tmp_path_factory.mktemp("bench-cache")


def run_smoke(name, tmp_path, monkeypatch, cache, *extra, design_rows=False, kriging_crps=True):
    """Run a comparison script at smoke size and check every row; ``design_rows``: the script's
    smoke has the calibrated ``APS[reverse/pairs,τ]`` rows of 0.4 (the bunny smoke);
    ``kriging_crps``: kriging's row has
    its Gaussian CRPS (every script built on ``_common.compare``)."""
    monkeypatch.setenv("GEODIFF_CACHE", str(cache))
    script = load_script(name)
    result = script.main(["--smoke", "--out", str(tmp_path / "out"), "--json", str(tmp_path / "r.json"),
                          "--save-sampler", str(tmp_path / "sampler.npz"), *extra])
    on_disk = json.loads((tmp_path / "r.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert {"seed", "data_source", "machine", "versions", "config"} <= set(on_disk["meta"])
    for row in on_disk["rows"]:
        assert ROW_KEYS <= set(row), row["method"]
        assert row["time_per_sample_s"] > 0 and 5 < row["psnr"] < 60 and row["mse"] > 0
        sampling = row["method"].endswith("(128)") or row["method"].startswith("DPS×")
        if sampling or row["method"] == "FlowPerY":
            assert 0 <= row["coverage90"] <= 1
        else:
            assert row["coverage90"] is None
        if sampling or (kriging_crps and row["method"] == "Kriging"):  # fair / Gaussian CRPS
            assert row["crps"] > 0
        else:
            assert row["crps"] is None
        if row["method"].startswith("APS"):
            assert row["training_s"] > 0 and row["learned_from"]
        if row["method"].startswith("APS["):
            assert row["temperature"] > 0 and row["calibration"]["pairs"] >= 2
        if row["method"].startswith("APS"):          # issue 22: the speed-ups in every benchmark
            assert row["speedup"] > 0
            assert (row.get("batch_per_field_s", 0) > 0) == row["method"].endswith("(128)")
    md = (tmp_path / "out" / "results.md").read_text()
    assert "per field in a batch (s)" in md
    assert md.count("| APS(128) |") >= 1
    assert (md.count("| APS[pairs,τ](128) |") >= 1) == design_rows
    return on_disk


# the rows 0.4 added to every comparison (smoke: the DPS ensemble of 2 chains in the ERA5-like
# smoke, the calibrated APS rows in the bunny smoke)
DESIGN_ROWS = {"DPS×2", "APS[reverse,τ](1)", "APS[reverse,τ](128)", "APS[pairs,τ](1)", "APS[pairs,τ](128)"}


def methods_by_task(rows):
    out = {}
    for r in rows:
        out.setdefault(r["task"], set()).add(r["method"])
    return out


def assert_flowpery_column(rows, md):
    """Every row has the PSNR on FlowPerY's signals (the first ``fpy_n``): FlowPerY's own equals
    its PSNR, and a method evaluated on more signals gives its PSNR on the subset, not over all."""
    import _common

    by = {r["method"]: r for r in rows}
    k = by["FlowPerY"]["n_eval"]
    assert all(isinstance(r[_common.FPY_PSNR], float) for r in rows)
    assert by["FlowPerY"][_common.FPY_PSNR] == pytest.approx(by["FlowPerY"]["psnr"], abs=1e-9)
    assert any(r["n_eval"] > k and r[_common.FPY_PSNR] != pytest.approx(r["psnr"]) for r in rows)
    assert "PSNR on the signals every method ran on (dB)" in md.read_text()


@pytest.mark.usefixtures("xla_optimized")
def test_era5_imputation_smoke(tmp_path, monkeypatch, bench_cache):
    from geodiff import AmortizedSampler

    on_disk = run_smoke("era5_imputation", tmp_path, monkeypatch, bench_cache)
    assert "ERA5-like (GloSea4-anchored)" in on_disk["meta"]["data_source"]
    assert methods_by_task(on_disk["rows"]) == {
        "ERA5-like imputation 60%, σ=0.05": {"Kriging", "Harmonic", "DPS", "APS(1)", "APS(128)",
                                             "DPS×2"}}
    by = {r["method"]: r for r in on_disk["rows"]}
    assert set(by["DPS"]["zeta_scores_on_validation"]) == {"0.1", "0.3"} and by["DPS"]["nfe"] == 10
    # a Gaussian fitted to (even 200) ERA5-like fields beats Laplacian interpolation on real fields
    assert by["Kriging"]["psnr"] > by["Harmonic"]["psnr"]
    assert by["APS(1)"]["break_even_n"] is None or by["APS(1)"]["break_even_n"] > 0
    assert by["DPS×2"]["n_eval"] == 2 and by["APS(128)"]["n_eval"] == 2
    assert all(r["rmse_K"] > 0 for r in on_disk["rows"])
    for name in ["results.json", "results.md", "globe.png", "globe_ortho.png"]:
        assert (tmp_path / "out" / name).stat().st_size > 0
    sampler = AmortizedSampler.load(tmp_path / "sampler.npz")
    assert sampler.manifold.n_vertices == 4140


@pytest.mark.slow
def test_bunny_mnist_inpainting_smoke(tmp_path, monkeypatch, bench_cache):
    from geodiff import AmortizedSampler

    on_disk = run_smoke("bunny_mnist_inpainting", tmp_path, monkeypatch, bench_cache,
                        design_rows=True)
    assert "MNIST on Stanford bunny res3" in on_disk["meta"]["data_source"]
    assert methods_by_task(on_disk["rows"]) == {
        "bunny inpaint 30%, σ=0.1": {"Kriging", "Harmonic", "DPS", "MCG", "APS(1)", "APS(128)",
                                     "FlowPerY", "APS[mixture,τ](1)", "APS[mixture,τ](128)"}
        | DESIGN_ROWS - {"DPS×2"}}
    mix = next(r for r in on_disk["rows"] if r["method"] == "APS[mixture,τ](128)")
    assert mix["mixture"]["components"] == 2 and mix["learned_from"].startswith("the prior's clean")
    assert all(r["ssim"] is None for r in on_disk["rows"])     # no 2-D layout on a mesh: MSE only
    assert_flowpery_column(on_disk["rows"], tmp_path / "out" / "results.md")
    assert (tmp_path / "out" / "bunny.png").stat().st_size > 0
    assert AmortizedSampler.load(tmp_path / "sampler.npz").manifold.n_vertices == 1887


@pytest.mark.slow
def test_image_inverse_smoke(tmp_path, monkeypatch, bench_cache):
    # two of the three tasks keep CI short: denoising (Noise2Score, the per-measurement base) and
    # SR (the shared dense base, which deblurring uses too); FlowPerY is covered by the other scripts
    on_disk = run_smoke("image_inverse", tmp_path, monkeypatch, bench_cache, "--tasks", "denoise", "sr2")
    assert "MNIST 32×32 standing in for CelebA" in on_disk["meta"]["data_source"]
    common = {"Kriging", "DPS", "APS(1)", "APS(128)"}
    assert methods_by_task(on_disk["rows"]) == {"grid denoise σ=0.1": common | {"Noise2Score"},
                                                "grid SR×2, σ=0.05": common}
    assert all(0 < r["ssim"] <= 1 for r in on_disk["rows"])
    centres = {r["task"]: r["centre"] for r in on_disk["rows"] if r["method"].startswith("APS")}
    assert centres == {"grid denoise σ=0.1": "tweedie", "grid SR×2, σ=0.05": "pnp"}
    for task in ("denoise", "sr2"):
        assert (tmp_path / f"sampler-{task}.npz").exists()
        assert (tmp_path / "out" / f"{task}.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.usefixtures("xla_optimized")
def test_generalization_smoke(tmp_path, monkeypatch, bench_cache):
    on_disk = run_smoke("generalization", tmp_path, monkeypatch, bench_cache, kriging_crps=False)
    tasks = methods_by_task(on_disk["rows"])
    assert len(tasks) == 7
    digits = [t for t in tasks if t.startswith("denoise")]
    blind = [t for t in tasks if t.startswith("blind")]
    assert len(digits) == 3 and len(blind) == 4
    assert all(tasks[t] == {"APS(1)", "APS(128)", "Noise2Score", "Kriging"} for t in digits)
    assert all(tasks[t] == {"APS(1)", "APS(128)", "Kriging", "Harmonic"} for t in blind)
    levels = sorted({r["mask_ratio"] for r in on_disk["rows"] if "mask_ratio" in r})
    assert levels == [0.3, 0.45, 0.6]
    for name in ("digits.png", "blind.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert (tmp_path / "sampler-denoise.npz").exists() and (tmp_path / "sampler-blind.npz").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("xla_optimized")
def test_generalization_one_part_runs_alone_and_resumes(tmp_path, monkeypatch, bench_cache, capsys):
    """``--tasks digits`` loads only the digits prior and writes only the digits rows and figure;
    with stages on (as in full mode), a rerun loads every evaluation case instead of recomputing it
    and gives the same rows."""
    monkeypatch.setenv("GEODIFF_CACHE", str(bench_cache))
    script = load_script("generalization")

    class On(script.Stages):                       # full-mode caching at smoke size
        def __init__(self, name, cfg, *, enabled, fresh=False, depends=()):
            super().__init__(name, cfg, enabled=True, fresh=fresh, depends=depends)

    monkeypatch.setattr(script, "Stages", On)
    args = ["--smoke", "--tasks", "digits"]
    first = script.main([*args, "--out", str(tmp_path / "out"), "--save-sampler",
                         str(tmp_path / "sampler.npz")])
    assert capsys.readouterr().out.count("] loaded from") == 0
    assert {t.split(",")[0] for t in methods_by_task(first["rows"])} == {"denoise σ=0.1"}
    assert first["meta"]["tasks"] == ["digits"] and set(first["meta"]["priors"]) == {"mnist"}
    assert "MNIST" in first["meta"]["data_source"] and "GloSea4" not in first["meta"]["data_source"]
    assert (tmp_path / "out" / "digits.png").exists() and not (tmp_path / "out" / "blind.png").exists()
    assert not (tmp_path / "sampler-blind.npz").exists()

    again = script.main([*args, "--out", str(tmp_path / "again")])
    loaded = capsys.readouterr().out
    assert loaded.count("[stage eval-") == 3 and "[stage digits-APS] loaded the trained sampler" in loaded
    assert again["rows"] == first["rows"]
    with pytest.raises(ValueError, match="cfg.tasks"):
        script.run(script.Config(tasks=()), tmp_path / "none")


def test_markdown_table_shows_an_extra_column_only_where_a_row_has_it():
    common = load_script("_common")
    rows = [{"task": "t", "method": "Kriging", "psnr": 30.0, "rmse_K": 1.5},
            {"task": "t", "method": "DPS", "psnr": 29.0}]
    extra = (("rmse_K", "RMSE (K)", ".2f"), common.FPY_COLUMN)
    head, rule, *lines = common.markdown_table(rows, extra=extra).splitlines()
    assert head.endswith("| n | RMSE (K) |") and rule.count("|---") == 11
    assert lines == ["| DPS | – | 29.00 | – | – | – | – | – | – | – | – |",
                     "| Kriging | – | 30.00 | – | – | – | – | – | – | – | 1.50 |"]


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
    # another t0 is another prior, cached under its own name
    other = script.main(["--smoke", "--dataset", "mnist", "--no-progress", "--t0", "1e-5",
                         "--out", str(tmp_path / "figs")])
    assert other["rows"][0]["trained_now"] and other["rows"][0]["t0"] == pytest.approx(1e-5)
    assert (tmp_path / "cache" / "priors" / "mnist-smoke-t01e-05.npz").exists()
    assert again["rows"][0]["t0"] == pytest.approx(1e-3)


@pytest.mark.slow
def test_aps_flow_cost_smoke(tmp_path, monkeypatch, bench_cache):
    monkeypatch.setenv("GEODIFF_CACHE", str(bench_cache))
    result = load_script("aps_flow_cost").main(["--smoke", "--steps", "3", "--batch", "4",
                                                "--json", str(tmp_path / "c.json")])
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"spectral", "ring MLP", "ring MLP + encoder"}
    assert rows["ring MLP + encoder"]["n_params"] > rows["ring MLP"]["n_params"] > rows["spectral"]["n_params"]
    for r in rows.values():
        assert r["step_s"] > 0 and r["sample_1_s"] > 0 and r["sample_128_s"] > 0
    assert json.loads((tmp_path / "c.json").read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    with pytest.raises(SystemExit, match="steps"):
        load_script("aps_flow_cost").main(["--smoke", "--steps", "2"])


@pytest.mark.slow
def test_archive_throughput_smoke(tmp_path, monkeypatch, bench_cache, xla_optimized):
    monkeypatch.setenv("GEODIFF_CACHE", str(bench_cache))
    result = load_script("archive_throughput").main(["--smoke", "--out", str(tmp_path / "out")])
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert {"machine", "versions", "matmul_peak_gflops", "seed", "data_source"} <= set(on_disk["meta"])
    rows = on_disk["rows"]
    assert {r["sampler"] for r in rows} == {"surrogate, spectral flow", "surrogate, ring-MLP flow",
                                            "surrogate R=4, spectral flow",
                                            "mixture K=2, spectral flow", "tweedie, spectral flow",
                                            "tweedie, ring-MLP flow"}
    for r in rows:
        assert r["sample_1_s"] > 0 and r["sample_n_s"] > 0 and r["batch_per_field_s"] > 0
        assert r["sample_1_known_s"] > 0 and r["sample_n_known_s"] > 0
        assert r["flops_batch"] > r["flops_n"] > r["flops_1"] > 0 and r["dps_s"] > 0
        # a mask seen before skips the base solve (the mask task's Gaussian centres); Denoise
        # and the mixture have no per-mask factor to keep
        if r["sampler"].startswith("surrogate"):
            assert r["flops_1_known"] < r["flops_1"]
        else:
            assert r["flops_1_known"] == r["flops_1"]
    (arch,) = [r for r in rows if "fields_per_s" in r]
    assert arch["archive_all_fields"] == 8 and arch["archive_quarter_fields"] == 2
    assert arch["archive_all_peak_rss_mb"] >= arch["archive_quarter_peak_rss_mb"] > 0
    assert arch["shared_archive_all_fields"] == 8 and arch["shared_fields_per_s"] > 0
    assert "fields/s" in (tmp_path / "out" / "results.md").read_text()
    with pytest.raises(SystemExit, match="n-archive"):
        load_script("archive_throughput").main(["--smoke", "--n-archive", "2"])


@pytest.mark.slow
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


def test_summarize_checks_targets(tmp_path):
    """The target table computes speed-ups, dB gaps, coverage and N* from the rows as written."""
    script = load_script("summarize")

    def row(task, method, t, psnr, cov=None, n=None):
        return {"task": task, "method": method, "time_per_sample_s": t, "psnr": psnr,
                "coverage90": cov, "break_even_n": n}

    era5 = "ERA5-like imputation 60%, σ=0.05"
    rows = [row(era5, "DPS", 10.0, 36.0), row(era5, "APS(1)", 1e-3, 33.0),
            row(era5, "APS(128)", 1e-3 / 128, 38.5, cov=0.97, n=12.0), row(era5, "Kriging", 1e-3, 39.0)]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps({"meta": {}, "rows": rows}))
    got = {e["target"]: e for e in script.main([str(tmp_path / "a"), "--json", str(tmp_path / "c.json")])}
    assert got["APS(1) speed-up per sample vs DPS"]["measured"] == "10,000×"
    assert got["APS(1) speed-up per sample vs DPS"]["met"]
    assert got["APS(128) speed-up per sample vs DPS"]["measured"] == "1,280,000×"
    assert got["APS(128) speed-up per sample vs DPS"]["met"]
    assert not got["90% coverage (held-out)"]["met"]                      # 0.97 over-covers
    assert got["APS(128) PSNR − DPS"]["measured"] == "+2.50 dB" and got["APS(128) PSNR − DPS"]["met"]
    assert got["APS(128) PSNR − kriging"]["met"]                         # −0.50 dB, on the boundary
    assert got["break-even N*"]["measured"] == "12.0"
    with pytest.raises(FileNotFoundError, match="results.json"):
        script.main([str(tmp_path / "missing")])
    from PIL import Image
    Image.new("RGB", (300, 100), (200, 30, 30)).save(tmp_path / "a" / "globe σ.png")
    (out,) = script.shrink_figures([tmp_path / "a"], tmp_path / "figs", width=150)
    assert out.name == "a-globe--.png" and Image.open(out).size == (150, 50)


def counting_stage(tmp_path, monkeypatch):
    """(the _common module on a fresh cache, the list of calls, a stage function that counts them)."""
    monkeypatch.setenv("GEODIFF_CACHE", str(tmp_path / "cache"))
    calls = []

    def stage():
        calls.append(1)
        return {"est": np.arange(6.0).reshape(2, 3)}, {"psnr": 30.0}
    return load_script("_common"), calls, stage


def test_stages_cache_resume_and_fresh(tmp_path, monkeypatch):
    """Full-mode stages: computed once, loaded on the next run, keyed by the config, --fresh drops them."""
    common, calls, stage = counting_stage(tmp_path, monkeypatch)

    cfg = common.Settings(seed=0)
    first = common.Stages("demo", cfg, enabled=True).run("Kriging", stage)
    again = common.Stages("demo", cfg, enabled=True).run("Kriging", stage)
    assert len(calls) == 1 and again[1] == {"psnr": 30.0}
    np.testing.assert_array_equal(again[0]["est"], first[0]["est"])
    common.Stages("demo", common.Settings(seed=1), enabled=True).run("Kriging", stage)   # other config
    common.Stages("demo", cfg, enabled=True, fresh=True).run("Kriging", stage)          # --fresh
    common.Stages("demo", cfg, enabled=False).run("Kriging", stage)                     # quick/smoke
    assert len(calls) == 4
    assert not list((tmp_path / "cache").rglob("*.tmp*"))                             # atomic writes


def test_stages_are_keyed_by_the_prior_files(tmp_path, monkeypatch):
    """A retrained prior (other bytes in a ``depends`` file) must not reuse the old stages."""
    common, calls, stage = counting_stage(tmp_path, monkeypatch)

    prior = tmp_path / "prior.npz"
    prior.write_bytes(b"weights v1")
    cfg = common.Settings(seed=0)
    common.Stages("demo", cfg, enabled=True, depends=[prior]).run("DPS", stage)
    common.Stages("demo", cfg, enabled=True, depends=[prior]).run("DPS", stage)      # same prior
    assert len(calls) == 1
    prior.write_bytes(b"weights v2")                                                 # retrained
    common.Stages("demo", cfg, enabled=True, depends=[prior]).run("DPS", stage)
    assert len(calls) == 2
    with pytest.raises(FileNotFoundError, match="depends"):
        common.Stages("demo", cfg, enabled=True, depends=[tmp_path / "missing.npz"])


def test_stages_of_one_task_are_shared_with_a_run_of_all(tmp_path, monkeypatch):
    """``--tasks`` picks stages, not the run's folder: a full run task by task (one session each)
    and a later run of every task load the same stages (every stage name carries its task)."""
    import dataclasses

    common, calls, stage = counting_stage(tmp_path, monkeypatch)

    @dataclasses.dataclass(frozen=True)
    class Config(common.Settings):
        tasks: tuple = ("denoise", "deblur")

    one = common.Stages("demo", Config(tasks=("denoise",)), enabled=True)
    both = common.Stages("demo", Config(), enabled=True)
    assert one.dir == both.dir
    one.run("denoise-DPS", stage)
    both.run("denoise-DPS", stage)
    assert len(calls) == 1
    assert common.Stages("demo", Config(seed=1), enabled=True).dir != both.dir


def test_flow_variants_share_the_baseline_stages(tmp_path, monkeypatch):
    """A flow setting of APS_FLOW_EXTRA (the condition encoder) keeps the run's folder, so the
    baselines are reused, and tags the APS stages, so a variant never loads another's sampler; at
    its neutral value the tag is empty (stages cached before the setting existed stay valid)."""
    import dataclasses

    common, calls, stage = counting_stage(tmp_path, monkeypatch)
    cfg = common.Settings(seed=0)
    enc = dataclasses.replace(cfg, aps_encoder_width=32)
    assert common.aps_tag(cfg) == "" and common.aps_tag(enc).startswith("-")
    assert common.aps_tag(dataclasses.replace(enc, aps_encoder_blocks=3)) != common.aps_tag(enc)
    plain, variant = (common.Stages("demo", c, enabled=True) for c in (cfg, enc))
    assert plain.dir == variant.dir
    plain.run("DPS", stage)
    variant.run("DPS", stage)                                        # shared: not computed again
    plain.run("x-APS" + common.aps_tag(cfg) + "-rows", stage)
    variant.run("x-APS" + common.aps_tag(enc) + "-rows", stage)     # its own stage
    assert len(calls) == 3
    assert common.Stages("demo", dataclasses.replace(cfg, aps_steps=7), enabled=True).dir != plain.dir


def test_calibration_on_validation_signals_shares_the_fits(tmp_path, monkeypatch):
    """``calib_on`` keeps the run's folder (fits and baselines reused) and tags the calibrated
    rows' stages; ``"val"`` sets τ on the validation signals tiled to ``calib_n`` pairs, every
    one of them used, never on the held-out training ones; bad values get clear errors."""
    import dataclasses

    common, calls, stage = counting_stage(tmp_path, monkeypatch)
    cfg = common.Settings(seed=0, calib_n=7)
    val_cfg = dataclasses.replace(cfg, calib_on="val")
    assert common.cal_tag(cfg) == "" and common.cal_tag(val_cfg).startswith("-")
    plain, variant = (common.Stages("demo", c, enabled=True) for c in (cfg, val_cfg))
    assert plain.dir == variant.dir
    plain.run("x-APS-pairs-cal" + common.cal_tag(cfg) + "-rows", stage)
    variant.run("x-APS-pairs-cal" + common.cal_tag(val_cfg) + "-rows", stage)   # its own stage
    assert len(calls) == 2

    held = np.full((5, 4, 1), -1.0, np.float32)
    val = np.arange(12, dtype=np.float32).reshape(3, 4, 1)
    assert common.calibration_signals(cfg, held, val) is held
    got = common.calibration_signals(val_cfg, held, val)
    assert got.shape == (7, 4, 1) and got.dtype == np.float32
    np.testing.assert_array_equal(got, val[[0, 1, 2, 0, 1, 2, 0]])
    many = np.zeros((9, 4, 1), np.float32)                 # more validation signals than calib_n
    assert common.calibration_signals(val_cfg, held, many).shape == (9, 4, 1)
    with pytest.raises(ValueError, match="calib_on"):
        common.calibration_signals(dataclasses.replace(cfg, calib_on="test"), held, val)
    with pytest.raises(ValueError, match="val"):
        common.calibration_signals(val_cfg, held, None)
    with pytest.raises(ValueError, match="val"):
        common.calibration_signals(val_cfg, held, val[:0])


def test_panel_labels_name_the_paper_loss_and_the_sample_means(tmp_path, monkeypatch):
    common, _, _ = counting_stage(tmp_path, monkeypatch)
    assert common.panel_label("APS(128)") == "APS(128) mean (paper's loss)"
    assert common.panel_label("APS[pairs,τ](128)") == "APS[pairs,τ](128) mean"
    assert common.panel_label("Kriging") == "Kriging"


def test_fit_aps_counts_the_training_time_before_a_resume(tmp_path, monkeypatch):
    """An interrupted APS fit resumed by the next run reports the whole training time (the history
    clock, which runs on across resumes), not only the wall time of the resumed part."""
    import jax

    from geodiff import AmortizedSampler, GaussianPrior, Grid
    from geodiff.operators import RandomMask
    from geodiff.train import load_checkpoint

    monkeypatch.setenv("GEODIFF_CACHE", str(tmp_path / "cache"))
    common = load_script("_common")
    grid = Grid(4, 5)
    prior = GaussianPrior.matern(grid, variance=0.05, length_scale=0.3, mean=0.4, nugget=1e-3)
    s = AmortizedSampler(grid, prior, RandomMask(0.5, 0.05), prior_term="exact", surrogate_rank=8,
                         n_steps=2, hidden=16, n_eig=8)
    train = s.operator.measure(jax.random.key(1), prior.sample(jax.random.key(2), 64))
    kw = dict(steps=12, batch_size=8, learning_rate=1e-3, seed=0, progress=False)

    fresh, info = common.fit_aps(s, train, stages=common.Stages("a", common.Settings(seed=0), enabled=True),
                                 **kw)
    assert not info["resumed"] and info["training_s"] > info["base_s"] > 0

    stages = common.Stages("b", common.Settings(seed=0), enabled=True)
    s.fit(jax.random.key(102), train, steps=6, batch_size=8, learning_rate=1e-3, progress=False,
          checkpoint_dir=stages.path("aps-ckpt"))                         # the interrupted run
    first = load_checkpoint(stages.path("aps-ckpt"))["history"]["time"][-1]
    resumed, info = common.fit_aps(s, train, stages=stages, **kw)
    total = load_checkpoint(stages.path("aps-ckpt"))["history"]["time"][-1]
    assert info["resumed"] and total > first > 0
    assert info["training_s"] == pytest.approx(info["base_s"] + total, rel=1e-12)
    assert info["training_s"] > first                                     # the first part counts
    for a, b in zip(jax.tree.leaves(fresh.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(a, b)                               # and resumes exactly


@pytest.mark.slow
def test_elbo_scan_smoke(tmp_path):
    script = load_script("elbo_scan")
    rows = script.main(["--smoke", "--out", str(tmp_path)])
    for r in rows:
        assert r["scales"][r["exact"].index(0.0)] == 1.0 and r["argmin_exact"] in r["scales"]
        assert len(r["elbo"]) == len(r["scales"])
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == json.loads(json.dumps(rows))


@pytest.mark.slow
def test_aps_design_smoke(tmp_path, monkeypatch, bench_cache):
    monkeypatch.setenv("GEODIFF_CACHE", str(bench_cache))
    rows = load_script("aps_design").main(["--smoke", "--out", str(tmp_path)])
    methods = {r["method"] for r in rows}
    assert {"Kriging", "Noise2Score", "APS tweedie/none", "APS tweedie/pairs+reverse τ",
            "APS mixture/none", "APS mixture/pairs+reverse τ"} <= methods
    for r in rows:
        if r["method"].startswith("APS"):
            assert 0 <= r["coverage90"] <= 1 and r["crps"] > 0 and r["temperature"] > 0
            # a trained row says which candidate the held-out validation kept
            assert (r["chosen"] is None) == (r["objective"] == "none")
            assert r["chosen"] in (None, "initial", "pairs", "reverse")
    assert (tmp_path / "results.md").read_text().startswith("# APS design table")


@pytest.mark.slow
def test_pnp_centre_smoke(tmp_path, monkeypatch, bench_cache):
    monkeypatch.setenv("GEODIFF_CACHE", str(bench_cache))
    rows = load_script("pnp_centre").main(["--smoke", "--out", str(tmp_path)])
    assert rows[0]["method"].startswith("kriging") and len(rows) == 5
    assert all(np.isfinite(r["psnr"]) and r["n_eval"] == 4 for r in rows)
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == json.loads(json.dumps(rows))


@pytest.mark.slow
def test_surrogate_rank_smoke(tmp_path, monkeypatch, bench_cache):
    monkeypatch.setenv("GEODIFF_CACHE", str(bench_cache))
    rows = load_script("surrogate_rank").main(["--smoke", "--out", str(tmp_path)])
    assert [r["rank"] for r in rows] == [16, 32]
    assert all(np.isfinite(r["kriging_psnr"]) and r["gflop_1_sample"] > 0 for r in rows)
    assert rows[1]["gflop_1_sample"] > rows[0]["gflop_1_sample"]      # the base solve is O(D R²)
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == json.loads(json.dumps(rows))


def test_shared_flags_override_the_mode(tmp_path):
    """--aps-objectives and --fpy-n replace the mode's settings (a full run that must fit in a
    session); bad values stop with the flag's name."""
    common = load_script("_common")
    seen = []

    def run(cfg, out, **kw):
        seen.append(cfg)
        return {"meta": {}, "rows": []}

    modes = {"full": common.Settings(), "quick": common.Settings(), "smoke": common.Settings()}
    common.main("doc", run, modes, str(tmp_path), argv=["--aps-objectives", "reverse", "--fpy-n", "0"])
    assert seen[-1].aps_objectives == ("reverse",) and seen[-1].fpy_n == 0
    common.main("doc", run, modes, str(tmp_path), argv=["--aps-objectives"])
    assert seen[-1].aps_objectives == () and seen[-1].fpy_n == modes["full"].fpy_n
    with pytest.raises(SystemExit, match="fpy-n"):
        common.main("doc", run, modes, str(tmp_path), argv=["--fpy-n", "-1"])
    with pytest.raises(SystemExit):
        common.main("doc", run, modes, str(tmp_path), argv=["--aps-objectives", "forward"])


def test_ring_mean_cost_smoke(tmp_path):
    """Both paths of the ring mean are timed on every shape and agree (they apply one operator);
    the recorded choice is ring_mean's rule."""
    result = load_script("ring_mean_cost").main(["--smoke", "--out", str(tmp_path)])
    assert (tmp_path / "results.json").exists()
    rows = result["rows"]
    assert [(r["B"], r["W"]) for r in rows] == [(1, 1), (16, 1), (2, 32)]
    assert [r["chosen"] for r in rows] == ["gather", "sparse", "gather"]
    for r in rows:
        assert all(r[k] > 0 for k in ("gather_fwd_ms", "sparse_fwd_ms", "gather_fwd_bwd_ms",
                                      "sparse_fwd_bwd_ms"))
        assert r["max_abs_diff"] < 1e-5
    with pytest.raises(SystemExit, match="--repeats must be ≥ 1"):
        load_script("ring_mean_cost").main(["--smoke", "--repeats", "0", "--out", str(tmp_path)])


def test_pair_outliers_flags_signals_outside_the_training_range():
    """A signal counts as outside the training range when some vertex lies more than OUT_Z
    marginal stds (√(Σ_r F² + nugget)) from the fit's mean."""
    script = load_script("pair_outliers")
    mean = np.zeros((3, 1))
    factor = np.array([[0.3, 0.4], [0.0, 0.0], [1.0, 0.0]])   # stds 0.5, 0.001, 1
    nugget = np.array([[0.0], [1e-6], [0.0]])
    z = script.OUT_Z
    test = np.zeros((4, 3, 1))
    test[0, 1] = 0.9 * z * 1e-3          # inside
    test[1, 1] = 1.1 * z * 1e-3          # outside: the floor vertex
    test[2, 0] = -1.1 * z * 0.5          # outside: a wide vertex, negative side
    test[3, 2] = 0.9 * z                 # inside
    assert script.out_of_range(test, mean, factor, nugget).tolist() == [False, True, True, False]


@pytest.mark.slow
def test_pair_outliers_smoke(tmp_path, monkeypatch, bench_cache):
    monkeypatch.setenv("GEODIFF_CACHE", str(bench_cache))
    result = load_script("pair_outliers").main(["--smoke", "--input-bound", "4",
                                                "--out", str(tmp_path / "out")])
    methods = [r["method"] for r in result["rows"]]
    assert methods[:3] == ["Kriging", "APS[pairs,τ](1)", "APS[pairs,τ](128)"]
    for row in result["rows"][1:3]:
        assert row["learned_from"] == "the prior's clean training set (simulated pairs)"
        assert row["n_diverged"] == len(row["diverged"]) and row["max_gap_to_kriging"] >= 0
        assert row["input_bound"] == 4.0 and 0 <= row["far_draw_share"] <= 1
    assert json.loads((tmp_path / "out" / "results.json").read_text())["rows"] == \
        json.loads(json.dumps(result["rows"]))


@pytest.mark.slow
def test_sample_latency_smoke(tmp_path, monkeypatch, bench_cache):
    monkeypatch.setenv("GEODIFF_CACHE", str(bench_cache))
    result = load_script("sample_latency").main(["--smoke", "--n", "4", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(result))
    rows = result["rows"]
    assert [r["variant"].split(",")[0] for r in rows] == ["sphere 46×90"] * 2 + ["grid 32×32 denoise"]
    for r in rows:
        assert all(r[f"{a}_{b}_mask_s"] > 0 for a in ("1", "n") for b in ("new", "known"))
    with pytest.raises(SystemExit, match="--n must be ≥ 2"):
        load_script("sample_latency").main(["--smoke", "--n", "1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--repeats must be ≥ 1"):
        load_script("sample_latency").main(["--smoke", "--repeats", "0", "--out", str(tmp_path)])
    st = load_script("sample_latency").main(["--smoke", "--stages", "--out", str(tmp_path)])
    assert [r["variant"].split(",")[0] for r in st["rows"]] == ["sphere 46×90"]
    for r in st["rows"]:
        assert list(r["cumulative_s"]) == list(st["meta"]["stages"])
        assert all(v > 0 for v in r["cumulative_s"].values())


def test_sample_latency_pauses_and_always_resumes_the_given_process():
    """--pause-pid: the process is stopped inside the timed block and running after it, also
    when the block raises."""
    import subprocess

    paused = load_script("sample_latency").paused
    proc = subprocess.Popen(["sleep", "60"])

    def state():
        return Path(f"/proc/{proc.pid}/stat").read_text().split(")")[1].split()[0]
    try:
        with paused(proc.pid):
            assert state() == "T"
        assert state() != "T"
        with pytest.raises(RuntimeError), paused(proc.pid):
            raise RuntimeError("boom")
        assert state() != "T"
        check = load_script("sample_latency").check_pause_pid
        for bad in (0, -1, os.getpid()):
            with pytest.raises(SystemExit, match="another process"):
                check(bad)
        with pytest.raises(SystemExit, match="this process's group"):
            check(proc.pid)                   # a child stays in the test's process group
    finally:
        proc.kill()
        proc.wait()
    with pytest.raises(SystemExit, match="--pause-pid"):
        check(proc.pid)                       # no longer exists


def test_speedups_and_batch_timing(tmp_path, monkeypatch):
    """add_speedups against hand-computed ratios; batch_timing times one compiled summary call per
    sampler; the mixture stand-in has the EM fit's shapes; batch_fields stays out of the hash."""
    import dataclasses

    from geodiff import AmortizedSampler, GaussianPrior, Grid
    from geodiff.operators import RandomMask

    common = load_script("_common")
    rows = [{"method": "APS(1)", "time_per_sample_s": 0.01},
            {"method": "APS(128)", "time_per_sample_s": 0.001},
            {"method": "APS[mixture,τ](128)", "time_per_sample_s": 0.002},
            {"method": "DPS", "time_per_sample_s": 3.0}]
    common.add_speedups(rows, {"APS": 0.05}, dps_time=3.0, batch=8)
    assert rows[0]["speedup"] == pytest.approx(300) and "batch_per_field_s" not in rows[0]
    assert rows[1]["speedup"] == pytest.approx(3000)
    assert rows[1]["batch_per_field_s"] == 0.05 and rows[1]["batch_fields"] == 8
    assert rows[1]["speedup_batch"] == pytest.approx(3.0 * 128 / 0.05)
    assert rows[2]["speedup"] == pytest.approx(1500) and "batch_per_field_s" not in rows[2]
    assert "speedup" not in rows[3]
    common.add_speedups(rows[:1], {}, dps_time=None, batch=8)     # no DPS: no ratio
    assert rows[0]["speedup"] == pytest.approx(300)

    g = Grid(4, 4)
    prior = GaussianPrior.matern(g, variance=0.05, length_scale=0.3, mean=0.4, nugget=1e-3)
    rng = np.random.default_rng(0)
    gauss = (rng.normal(size=(16, 1)), rng.normal(size=(16, 3)), np.full((16, 1), 0.1))
    mix = common.mixture_stand_in(gauss, components=3, rank=5)
    assert mix.mean.shape == (3, 16, 1) and mix.factor.shape == (3, 16, 5)
    np.testing.assert_array_equal(np.asarray(mix.factor[2, :, :3]), np.float32(gauss[1]))
    assert not np.asarray(mix.factor[:, :, 3:]).any()
    np.testing.assert_allclose(np.exp(np.asarray(mix.log_weights)), 1 / 3, rtol=1e-6)

    op = RandomMask(0.5, 0.1).on(g)
    meas = op.measure(jax.random.key(0), np.asarray(prior.sample(jax.random.key(1), 5)))
    sampler = AmortizedSampler(g, prior, op, n_steps=1, hidden=4, n_eig=4)
    per_field = common.batch_timing({"APS": sampler, "APS[reverse,τ]": sampler}, meas, batch=64,
                                    n=4, repeats=1)
    assert set(per_field) == {"APS", "APS[reverse,τ]"} and per_field["APS"] > 0
    assert per_field["APS[reverse,τ]"] == per_field["APS"]      # one sampler, timed once
    with pytest.raises(ValueError, match="batch"):
        common.batch_timing({"APS": sampler}, meas, batch=0)

    monkeypatch.setenv("GEODIFF_CACHE", str(tmp_path))
    s = common.Settings()
    digests = set()
    for cfg in (s, dataclasses.replace(s, batch_fields=8)):
        stages = common.Stages("t", cfg, enabled=True)
        digests.add(stages.dir.name)
    assert len(digests) == 1
