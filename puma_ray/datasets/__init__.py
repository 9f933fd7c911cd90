"""Data sets puma-ray can make for itself (see :mod:`puma_ray.datasets.synthetic`)."""
