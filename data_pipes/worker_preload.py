"""What the reader's fork server imports before forking DataLoader workers
(data_pipes/stream.py): the reader with torch, torchrec and pyarrow (a worker then starts in
milliseconds instead of re-importing them, ~3 s) and its numba kernels loaded (~0.8 s per
process otherwise, data_pipes/kernels.py)."""

from data_pipes import kernels, stream  # noqa: F401

kernels.warm()
