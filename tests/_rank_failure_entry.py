"""A torchrun entry point for tests/test_bad_inputs.py: `genci_dist.train.main`, except that
on rank 1 (only) reading the dataset's manifest fails as a corrupt manifest would, with the
project's DatasetError, while rank 0 goes on into the sharding planner's collectives."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if os.environ.get("RANK") == "1":
    import genci_dist.runtime.trainer as trainer
    from data_pipes.schema import DatasetError

    def _corrupt_manifest(dataset_dir: str | Path) -> None:
        raise DatasetError(f"{Path(dataset_dir) / 'manifest.json'}: line 1: not valid JSON "
                           "(injected on rank 1 by the test)")

    trainer.load_manifest = _corrupt_manifest

from genci_dist.train import main  # noqa: E402

raise SystemExit(main())
