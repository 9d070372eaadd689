"""Embedding throughput of the item tokenizer's text model, as JSON lines.

`python -m genci_dist.bench.tokenizer --items DATASET/items.parquet --n 4000 [--threads T]`

For the first n item texts (and a variant with realistic length spread: text i repeated
1 + i % 8 times, as titles plus descriptions would be) it times, on the same loaded model:
``unsorted`` (batches in catalogue order), ``sorted`` (sentence-transformers' length-sorted
batches, what `embed_texts` does inside each chunk) and ``bf16`` (weights in bfloat16, sorted),
reporting items/s by wall and CPU seconds, the machine load, and bf16's largest cosine gap to
float32. One line per (texts, variant).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="genci_dist.bench.tokenizer", description=__doc__)
    p.add_argument("--items", required=True, help="a prepared dataset's items.parquet")
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="0 = the affinity mask")
    p.add_argument("--variants", default="unsorted,sorted,bf16")
    args = p.parse_args(argv)
    from genci_dist.tokenizer.cli import pin_threads

    with pin_threads(args.threads) as n_threads:
        import numpy as np
        import pyarrow.parquet as pq
        import torch

        from genci_dist.tokenizer.config import DEFAULT_MODEL
        from genci_dist.tokenizer.embed import _encode_with, _load_model, resolve_model_path

        texts = pq.read_table(args.items, columns=["text"]).column("text").to_pylist()[:args.n]
        spread = [" ".join([t] * (1 + i % 8)) for i, t in enumerate(texts)]
        st = _load_model(resolve_model_path(DEFAULT_MODEL), False)
        _encode_with(st, texts[:64], args.batch)  # warm-up
        ref: dict[str, np.ndarray] = {}
        for name, tx in (("catalogue", texts), ("length_spread", spread)):
            for variant in args.variants.split(","):
                model = st
                if variant == "bf16":
                    import copy

                    model = copy.deepcopy(st).to(torch.bfloat16)
                w0, c0 = time.perf_counter(), _cpu()
                v = _encode_with(model, tx, args.batch, sort_by_length=variant != "unsorted")
                wall, cpu = time.perf_counter() - w0, _cpu() - c0
                row = {"bench": "tokenizer_embed", "texts": name, "variant": variant,
                       "n": len(tx), "mean_chars": round(float(np.mean([len(t) for t in tx])), 1),
                       "batch": args.batch, "threads": n_threads,
                       "items_per_s": round(len(tx) / wall, 1), "wall_s": round(wall, 2),
                       "cpu_s": round(cpu, 2), "load1": round(os.getloadavg()[0], 2)}
                if variant == "sorted":
                    ref[name] = v
                elif name in ref:
                    a, b = ref[name], v
                    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
                    row["max_cosine_gap_vs_sorted_fp32"] = float(1 - cos.min())
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
