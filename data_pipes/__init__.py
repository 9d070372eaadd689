"""Data pipes of genci-dist: sources, the preparation protocol, the sequence layout, readers."""

from data_pipes import omp as _omp

_omp.apply_default()  # before anything imports torch (libgomp reads it once, at load)
