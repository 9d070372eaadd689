"""The training runtime: process group and devices (`distributed`), the sharding plan and
optimizers (`sharding`), DCP checkpoints (`checkpoint`), the training loop (`trainer`), the
evaluation loop (`evaluation`), metrics, the per-step log and console, dataset preparation on
first use (`datasets`). Depends on `genci_dist.model`, `genci_dist.tokenizer` and `data_pipes`;
nothing below it imports it."""
