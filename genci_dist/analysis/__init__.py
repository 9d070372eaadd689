"""Post-hoc analyses of finished runs: the results table and figures (`report`, the
`genci-report` CLI), interest volatility (paper Table 5, `volatility`), calibration, and the
intent map (paper Fig. 4, `intent_map`). Reads runs, checkpoints and predictions; the runtime
never imports it (except the trainer's optional training-curve plot)."""
