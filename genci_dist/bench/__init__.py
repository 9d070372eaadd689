"""Benchmarks that print JSON lines: `genci-bench` (`cli`, the real Trainer stack at 1 or 2
ranks), its measurement pieces (`measure`), and the constrained beam search alone (`beam`)."""
