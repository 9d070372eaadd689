"""`python -m genci_dist.bench` = `genci-bench`."""

from genci_dist.bench.cli import main

raise SystemExit(main())
