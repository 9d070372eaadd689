"""A torchrun entry point for tests/test_bad_inputs_dist.py: `genci_dist.train.main`, except
that on one rank (GENCI_TEST_FAIL_RANK, default 1) reading the dataset's manifest fails as a
corrupt manifest would, with the project's DatasetError, while the other rank goes on into
the sharding planner's collectives."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FAIL_RANK = os.environ.get("GENCI_TEST_FAIL_RANK", "1")

if os.environ.get("RANK") == FAIL_RANK:
    import genci_dist.runtime.trainer as trainer
    from data_pipes.schema import DatasetError

    def _corrupt_manifest(dataset_dir: str | Path) -> None:
        raise DatasetError(f"{Path(dataset_dir) / 'manifest.json'}: line 1: not valid JSON "
                           f"(injected on rank {FAIL_RANK} by the test)")

    trainer.load_manifest = _corrupt_manifest

from genci_dist.train import main  # noqa: E402

raise SystemExit(main())
