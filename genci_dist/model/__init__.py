"""GenCI and its baselines. No torch.distributed here: DMP shards the EBCs from outside."""
