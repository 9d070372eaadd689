"""genci-dist: distributed TorchRec training of the GenCI generative CTR model."""

import data_pipes as _data_pipes  # noqa: F401  (sets the OpenMP wait policy before torch loads)
