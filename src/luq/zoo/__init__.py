"""Derived test models built from luq's offline assets (see :mod:`luq.zoo.offgrid`)."""
