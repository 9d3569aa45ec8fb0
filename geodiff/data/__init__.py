"""Offline datasets and loaders for online ones (docs/data.md).

- ERA5-like temperature on the 46×90 sphere, anchored on the real GloSea4 fields of
  ``iris-sample-data`` (:func:`era5_like`, :func:`glosea4_split`); loaders for GASP's ERA5 ``.npz``
  files and for netCDF/xarray ERA5.
- MNIST 32×32 (:func:`mnist32`, the offline stand-in for CelebA), the UCI digits of scikit-learn
  (:func:`digits32`, a second data set for cross-dataset checks) and a CelebA loader.
- MNIST digits on the Stanford bunny (:func:`bunny_mnist`).
"""

from geodiff.data.bunny_mnist import bunny_mnist, project_image
from geodiff.data.era5 import (GASP_TMAX, GASP_TMIN, denormalize, era5_like, glosea4_fields,
                               glosea4_split, glosea4_split_info, load_era5_xarray, load_gasp_era5,
                               normalize, read_pp)
from geodiff.data.images import digits32, load_celeba, mnist32, mnist32_labels, mnist_digits, mnist_split_indices

__all__ = ["GASP_TMAX", "GASP_TMIN", "bunny_mnist", "denormalize", "digits32", "era5_like", "glosea4_fields",
           "glosea4_split", "glosea4_split_info", "load_celeba", "load_era5_xarray", "load_gasp_era5",
           "mnist32", "mnist32_labels", "mnist_digits", "mnist_split_indices", "normalize",
           "project_image", "read_pp"]
