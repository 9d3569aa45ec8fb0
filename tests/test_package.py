"""Package hygiene: one version, sub-modules as lazy attributes, a light ``import geodiff``."""

import importlib.metadata
import os
import pkgutil
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

import geodiff as gd

ROOT = Path(__file__).resolve().parents[1]


def test_version_has_one_source():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"], "the version lives in geodiff/__init__.py only"
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "geodiff.__version__"}


def test_installed_version_matches_package():
    installed = importlib.metadata.version("geodiff")
    assert installed == gd.__version__, (
        f"installed metadata says {installed}, geodiff.__version__ is {gd.__version__}: "
        "reinstall (pip install -e .)")


def test_changelog_top_entry_is_this_release():
    release = re.match(r"\d+\.\d+\.\d+", gd.__version__).group()     # 0.4.0.dev0 → 0.4.0
    top = re.search(r"^## (\S+)", (ROOT / "docs" / "changelog.md").read_text(), re.M).group(1)
    assert top == release


def test_submodules_are_attributes():
    from geodiff.baselines import dps

    assert gd.baselines.dps is dps
    for name in gd._SUBMODULES:
        assert getattr(gd, name).__name__ == f"geodiff.{name}"
    assert gd._SUBMODULES <= set(dir(gd))
    assert {"Grid", "AmortizedSampler", "__version__"} <= set(dir(gd))


def test_every_public_module_is_an_attribute():
    # geodiff.timing is a helper of the benchmark scripts, imported by its full name
    public = {m.name for m in pkgutil.iter_modules(gd.__path__) if not m.name.startswith("_")}
    missing = public - gd._SUBMODULES - {"timing"}
    assert not missing, f"add {sorted(missing)} to geodiff._SUBMODULES (geodiff/__init__.py)"


def test_unknown_attribute():
    with pytest.raises(AttributeError, match=r"^module 'geodiff' has no attribute 'nope'$"):
        gd.nope  # noqa: B018
    assert not hasattr(gd, "nope")
    with pytest.raises(ImportError):
        from geodiff import nope  # noqa: F401


def test_import_is_light_and_submodules_load_on_access():
    script = textwrap.dedent("""
        import sys
        import geodiff as gd
        heavy = [m for m in ("matplotlib", "cartopy", "geodiff.plot", "geodiff.data",
                             "geodiff.baselines", "geodiff.metrics") if m in sys.modules]
        assert not heavy, f"import geodiff imported {heavy}"
        assert "plot" not in vars(gd)
        gd.plot
        assert "geodiff.plot" in sys.modules and "plot" in vars(gd)    # bound after first access
        assert callable(gd.baselines.dps) and callable(gd.metrics.psnr)
        print("ok")
    """)
    env = {**os.environ, "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
