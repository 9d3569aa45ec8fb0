"""Priors shipped inside the package: each loads, says what its units mean, and reproduces the
held-out ELBO of its model card."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from geodiff import DiffusionPrior

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = DiffusionPrior.pretrained_names()


def _ship_script():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("ship_prior", ROOT / "benchmarks" / "ship_prior.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["ship_prior"] = module
    spec.loader.exec_module(module)
    return module


def test_at_least_one_prior_is_shipped_and_unknown_names_are_refused():
    assert SHIPPED, "no prior in geodiff/pretrained/"
    with pytest.raises(ValueError, match="no shipped prior 'nope'"):
        DiffusionPrior.pretrained("nope")
    with pytest.raises(ValueError, match="no shipped prior"):
        DiffusionPrior.pretrained_card("nope")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_prior_reproduces_its_card(name):
    """The held-out ELBO recomputed as the card says (same signals, key and n_t) equals the
    card's number; the file is small and records its data's units."""
    ship = _ship_script()
    card = DiffusionPrior.pretrained_card(name)
    prior = DiffusionPrior.pretrained(name)
    assert prior.data_info == card["data_info"] and {"offset", "scale", "units"} <= set(card["data_info"])
    assert repr(prior.manifold) == card["manifold"]
    assert (ROOT / "geodiff" / "pretrained" / f"{name}.npz").stat().st_size < 2_000_000
    dataset = next(k for k in ship.SHIPPED for mode in ("full", "quick")
                   if ship.shipped_name(k, mode) == name)
    assert card["training"].get("mode", "full") in ("full", "quick")
    elbo = ship.held_out_elbo(prior, ship.held_out(dataset))
    # a float32 network summed in whatever order this machine's XLA picks (the card's number
    # was computed with XLA's optimizations on, the tests run with them off): 1e-4 relative
    np.testing.assert_allclose(elbo, card["held_out_elbo"]["nats_per_dim"], rtol=1e-4)
