"""Reader throughput benchmark (JSON lines on stdout).

    python -m data_pipes.bench_reader --data data/ml-1m --split train --batch-size 1024

Measures, in one run on the same files: plain `pyarrow.parquet` scans of the split into Arrow
tables, nothing else (row group by row group, opening the file for each one or each file once
as the reader does; whole files with `pq.read_table`; `ParquetFile.iter_batches`) and the
streaming reader with batch building (shuffle, KJTs, padding, semantic-ID tokens) at several
worker counts, for each batch layout a model reads (genci_dist.model.build.batch_fields):

    full    the history as semantic-ID tokens and as item ids (sequence KJT, dense history)
    genci   tokens only (GenCI)
    din     item ids only (DIN)
    fields  neither (DeepFM, DCNv2)

with and without read-ahead (the reader's next row group read from Parquet on a second thread
while batches are built; --read-ahead). The raw scan decodes columns on Arrow's thread pool,
so with read-ahead both sides may use two cores; the CPU seconds count both threads.

Layouts with tokens are left out when the dataset has no semantic IDs yet.

How to read it. The bench runs in rounds: the four scans, then every reader configuration.
It prints best-of times and each round's paired scan/reader ratio. The machine's speed
drifts by ±20–30 % between minutes, so the paired ratios, pooled over runs, are the figures
to read. Each reader line gives its paired median ratio to every scan
(`ratio_paired_median_by_scan`) and to the strictest one (`ratio_paired_median_strictest`).
`raw_pyarrow_scan` re-parses a file's footer for every row group (~20 % of that scan), and
the open-once scan does not. `pq.read_table`'s best-of swings widely between runs
(0.10–0.37 s on ML-1M train), so always check which scan was strictest. The reader does
everything a Batch needs on top of the scan: shuffle, validation, ids, padding, lookups.

The before/after figures of earlier reader designs are in README "Speed" (with commits) and
in this file's git history; below, today's.

Blocks and compiled batch assembly (data_pipes/blocks.py; 2026-12-06, fbbdfbc before, 636ec8d
after). A block keeps one int64 row per sample (sequence row, item, label, history start and
length, row id), cut straight into the epoch's row order by a compiled loop on the
read-ahead thread; features stay one row per user and per item, and a batch is written by
compiled passes. M samples/s, best of 3, two interleaved before/after rounds, `--workers 0
--repeats 3 --read-ahead true`, background training paused:
  ML-1M   batch 1024  genci  2.05, 2.00 -> 2.89, 3.03
                      din    2.20, 2.15 -> 3.45, 3.57
                      fields 3.27, 3.06 -> 5.47, 5.43
          batch 4096  genci  2.84, 2.74 -> 4.89, 4.66
                      fields 4.06, 3.88 -> 6.78, 6.71
  ML-100K batch 1024  genci  1.63, 1.89 -> 2.22, 2.29
                      din    1.80, 2.16 -> 2.57, 2.62
                      fields 2.47, 3.01 -> 3.54, 3.68
  syn. s = 1          din    2.96, 2.71 -> 4.12, 3.83
                      fields 3.64, 3.40 -> 5.33, 5.10
Paired ratio to each scan, after (ML-1M, batch 1024, two rounds): row group by row group
genci 0.49, 0.50; din 0.56, 0.59; fields 0.90, 0.88. Open-once 0.28-0.32 / 0.35 / 0.54-0.56.
Strictest (whole files) 0.17-0.24 / 0.19-0.28 / 0.30-0.44. Batch 4096: 0.69-0.75 / (fields)
0.96-1.01 of the row-group scan, strictest 0.28 / 0.37-0.38. ML-100K: 0.35 / 0.39-0.41 /
0.51-0.53 of the row-group scan; its one block is read and cut before the first batch (8 of
its 23 ms per epoch), nothing overlaps it. Where a GenCI batch of 1024 goes (ML-1M, blocks
decoded, cProfile): token fill 66 us, fill_fields 35, count_fields 14, the storage ~25-50 (11
tensors of one storage), two KJTs ~25, the rest Python; about 210 us per batch, against
~70 us of the strictest scan per 1024 samples. Again at 1cff220, two more rounds (ML-1M,
batch 1024): genci 2.09, 2.11 -> 3.22, 3.22; din 2.16, 2.30 -> 3.63, 3.60; fields 3.25, 3.37
-> 5.69, 5.79 M samples/s; of the row-group scan 0.52, 0.52 / 0.59, 0.60 / 0.92, 0.97, of
the strictest 0.20-0.23 / 0.23-0.27 / 0.36-0.42. With one worker process (`--workers 1`, the
trainer's setting; one run, best of 2): genci 0.50 -> 0.58, fields 0.64 -> 0.68 M samples/s,
bound by the batch's hand-over through shared memory, not by building it.
Not kept: filling batch j on a third thread while batch j + 1 is prepared (genci 2.89, 3.03
-> 2.69, 2.45 M samples/s, CPU 0.25 -> 0.29-0.31 s: the hand-over and the GIL cost more than
the overlap gains).

`reader_stages` (a line per layout, `stage_costs`): the CPU seconds of each stage of an epoch
run alone on one thread (read, decode, assemble; `compiled` = only the compiled passes and
their glue into one reused buffer: no allocation, tensors or KJTs), and the ratio to the
strictest scan the reader could reach if that work were split perfectly over two threads.
ML-1M, batch 1024, two runs (2026-12-06, quiet machine): GenCI read 0.038 + decode 0.021-0.023
+ assemble 0.099-0.103 (173-180 us per batch; compiled 136-139 us) s, bound 0.31-0.35 (compiled
only: 0.36-0.40); DIN the same within 2 %; fields assemble 0.053 (92 us; compiled 59 us), bound
0.44-0.49 (0.52-0.59). ML-100K GenCI bound 0.21 (0.27), fields 0.51 (0.60). The reader's own
Parquet read costs about what the whole two-thread scan costs in CPU, so 0.5 of that scan needs
everything after the read (validation, the cut, ~970 bytes per GenCI sample written) to cost
less than the read itself, and it costs 2.6x as much for GenCI even without Python. The reader
itself reaches 0.20-0.23 (GenCI) of that scan, its work being mostly serial: splitting it over
threads loses to the GIL. Assembling pre-decoded ML-1M GenCI batches (an ad hoc script over the
blocks `stage_costs` decodes) on two threads instead of one took 150-169 instead of 114 ms;
only the compiled passes (one reused buffer per thread), 97-103 instead of 79 ms; only the
allocation and tensor views, 70-78 instead of 27 ms (each handover of the GIL between the per-
batch Python steps costs more than the compiled loop between them saves; a numba loop alone
scales 2x on these two cores).

`write_floor` (a line per layout): the bytes of an epoch's batches and the time to write each
of them once into fresh buffers. It shows the target ratio is not out of reach by bandwidth:
on ML-100K genci batches are 973 bytes per sample, written in 1.2 ms per epoch, 4.8x faster
than the strictest scan (2026-12-06). The reader's cost is the random gathers and the
per-batch numpy and Python steps (~100 us per batch of 1024 outside the loops, the storage's
allocation included).

Design choices behind those figures (data_pipes/stream.py):
- The read-ahead thread reads and decodes each block; Arrow's read and the compiled cut run
  without the GIL, so both overlap the batches built meanwhile (`StreamingSplit._read_block`
  has the figures; a numpy decode there had been slower).
- Not kept: two or three read-ahead threads (0.424 vs 0.427 s per epoch), Arrow's thread pool
  for the read (0.417 vs 0.317 s), int16 tokens (inconclusive), and the `memory_map`,
  `pre_buffer` and `read_dictionary` options (no gain).

Other measurements:
- With worker processes, the trainer receives each batch through shared memory. That costs
  ≈ 0.6 ms of its CPU per batch whatever the batch's size: more than building a batch costs
  (2026-12-04, f30e630). The configs therefore keep `data.num_workers = 1`.
- Length bucketing (`--bucket-window 32`) makes the reader slower, 0.55–0.60 CPU s per epoch
  for GenCI's layout (2026-11-24, 5155910). Its batches gather from several row groups at
  narrower widths, but the encoder work it saves is worth far more.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from data_pipes.batch import storage_places
from data_pipes.blocks import assemble_batch, batch_shape, write_batch
from data_pipes.collate import TOKEN_DTYPE
from data_pipes.memory import keep_freed_memory
from data_pipes.schema import SEMANTIC_IDS
from data_pipes.stream import StreamingSplit, _WorkerCache, build_loader, list_row_groups


def raw_scan(dataset_dir: Path, split: str, open_once: bool = False) -> tuple[int, float, float]:
    """(samples of the split, wall seconds, this process's CPU seconds) of reading every
    sequence row group holding samples of the split, all columns. open_once: open each file
    once instead of once per row group, as the reader does (re-parsing the footer is ~20% of
    this scan)."""
    t0, c0 = time.perf_counter(), time.process_time()
    rows = 0
    files: dict[Path, pq.ParquetFile] = {}
    for g in list_row_groups(dataset_dir, split):
        if not open_once or g.path not in files:
            files[g.path] = pq.ParquetFile(g.path)
        files[g.path].read_row_group(g.index)
        rows += g.rows
    return rows, time.perf_counter() - t0, time.process_time() - c0


def whole_file_scan(dataset_dir: Path, split: str,
                    how: str = "read_table") -> tuple[int, float, float]:
    """(samples of the split, wall seconds, CPU seconds) of the sequence files holding the
    split read file by file with `pq.read_table` (how="read_table") or streamed with
    `ParquetFile.iter_batches` (how="iter_batches"): the other plain pyarrow scans, faster
    than row group by row group."""
    groups = list_row_groups(dataset_dir, split)
    files = sorted({g.path for g in groups})
    t0, c0 = time.perf_counter(), time.process_time()
    if how == "read_table":
        for f in files:
            pq.read_table(f)
    else:
        for f in files:
            for _ in pq.ParquetFile(f).iter_batches():
                pass
    return sum(g.rows for g in groups), time.perf_counter() - t0, time.process_time() - c0


# every plain scan of a round: JSON name → (rows, wall s, CPU s)
SCANS = {
    "raw_pyarrow_scan": raw_scan,
    "raw_pyarrow_scan_open_once": functools.partial(raw_scan, open_once=True),
    "raw_pyarrow_read_table": functools.partial(whole_file_scan, how="read_table"),
    "raw_pyarrow_iter_batches": functools.partial(whole_file_scan, how="iter_batches"),
}


# layout → (with_tokens, with_history_ids)
LAYOUTS = {"full": (True, True), "genci": (True, False), "din": (False, True),
           "fields": (False, False)}


def reader_scan(dataset_dir: Path, split: str, batch_size: int, workers: int,
                layout: str, bucket_window: int = 0, keep_freed: bool = False,
                read_ahead: bool = True, shuffle_block: int = 16) -> tuple[int, float, float]:
    """(rows, wall seconds, main-process CPU seconds: the whole cost only with 0 workers)."""
    tokens, ids = LAYOUTS[layout]
    loader = build_loader(dataset_dir, split, batch_size=batch_size, num_workers=workers,
                          seed=0, shuffle=True, with_tokens=tokens, with_history_ids=ids,
                          bucket_window=bucket_window, keep_freed_memory=keep_freed,
                          read_ahead=read_ahead, shuffle_block=shuffle_block)
    t0, c0 = time.perf_counter(), time.process_time()
    rows = sum(b.size for b in loader)
    return rows, time.perf_counter() - t0, time.process_time() - c0


def batch_bytes(dataset_dir: Path, split: str, batch_size: int, layout: str) -> list[int]:
    """Bytes of each Batch of one epoch (its one storage, data_pipes.batch.alloc_storage)."""
    tokens, ids = LAYOUTS[layout]
    loader = build_loader(dataset_dir, split, batch_size=batch_size, num_workers=0, seed=0,
                          shuffle=True, with_tokens=tokens, with_history_ids=ids)
    return [b.labels.untyped_storage().nbytes() for b in loader]


def write_floor(sizes: list[int]) -> tuple[float, float]:
    """(wall s, CPU s) of writing every byte of an epoch's batches once, batch by batch, into
    fresh buffers: what any reader producing these batches must at least do, on one thread."""
    t0, c0 = time.perf_counter(), time.process_time()
    for n in sizes:
        np.empty(n, dtype=np.uint8).fill(1)
    return time.perf_counter() - t0, time.process_time() - c0


def _best_cpu(job: Callable[[], object], repeats: int) -> tuple[float, object]:
    """(least CPU seconds of `repeats` runs of job, its last result)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        c0 = time.process_time()
        out = job()
        best = min(best, time.process_time() - c0)
    return best, out


def stage_costs(dataset_dir: Path, split: str, batch_size: int, layout: str,
                repeats: int = 3) -> dict[str, float]:
    """CPU seconds of each stage of the reader's epoch (no bucketing), one stage at a time on
    one thread, best of `repeats`: `read` every block's row groups from Parquet, `decode`
    them into Blocks (validation and the compiled cut), `assemble` every batch from the
    decoded blocks (data_pipes.blocks.assemble_batch, tensors and KJTs included), and
    `compiled` only its compiled passes (batch_shape + write_batch into one buffer reused
    for every batch: no allocation, no tensors, no KJTs). read + decode + assemble is the
    reader's work for an epoch without the DataLoader; read + decode + compiled the least a
    reader writing these batches through these kernels could do."""
    tokens, ids = LAYOUTS[layout]
    ds = StreamingSplit(dataset_dir, split, batch_size=batch_size, rank=0, world_size=1,
                        seed=0, shuffle=True, with_tokens=tokens, with_history_ids=ids,
                        read_ahead=False)
    plan, cache = ds.plan(), _WorkerCache()
    blocks = range(len(plan.blocks))
    read, tables = _best_cpu(lambda: [ds._read_tables(plan, k, cache) for k in blocks], repeats)
    decode, decoded = _best_cpu(lambda: [ds._decode(plan, k, tables[k]) for k in blocks],
                                repeats)
    batches = [[(decoded[k], pos) for k, pos in plan.segments(j)] for j in range(plan.steps)]
    table = (None if ds.item_tokens is None
             else np.ascontiguousarray(ds.item_tokens, dtype=TOKEN_DTYPE))

    def assemble() -> int:
        return sum(assemble_batch(parts, ds.features, ds.fields, ds.item_tokens,
                                  ds.pad_history_to, ds.with_history_ids).size
                   for parts in batches)

    buf = np.empty(0, np.uint8)

    def compiled() -> None:
        nonlocal buf
        for parts in batches:
            shape = batch_shape(parts, ds.fields, table, ds.pad_history_to, ids)
            starts, end = storage_places(shape.specs)
            if buf.size < end:
                buf = np.empty(end, np.uint8)
            write_batch(parts, shape, ds.fields, table,
                        [np.ndarray(sh, dt, buf, a) for a, (sh, dt) in zip(starts, shape.specs,
                                                                          strict=True)], ids)

    cpu_assemble, rows = _best_cpu(assemble, repeats)
    if rows != (expected := sum(g.rows for g in plan.groups)):
        raise SystemExit(f"stage costs: {rows} rows assembled, the split has {expected}")
    return {"read": read, "decode": decode, "assemble": cpu_assemble,
            "compiled": _best_cpu(compiled, repeats)[0], "batches": plan.steps}


def _median_ratio(raws: list[tuple[int, float, float]], runs: list[tuple[int, float, float]],
                  field: int) -> float:
    """Median over rounds of raw / reader (field 1 = wall, 2 = CPU seconds)."""
    return round(statistics.median(a[field] / b[field] for a, b in zip(raws, runs,
                                                                        strict=True)), 3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--bucket-window", type=int, default=0,
                   help="length bucketing window of the reader (0 = off)")
    p.add_argument("--shuffle-block", type=int, default=16,
                   help="row groups whose samples the reader shuffles jointly")
    p.add_argument("--layouts", default=",".join(LAYOUTS),
                   help=f"batch layouts to measure, comma-separated, of {list(LAYOUTS)}")
    p.add_argument("--read-ahead", default="false,true",
                   help="reader read-ahead settings to measure, comma-separated true/false")
    p.add_argument("--keep-freed-memory", choices=("true", "false"), default="true",
                   help="glibc keeps freed memory for reuse in this process and the workers, "
                        "as the trainer runs the reader (train.keep_freed_memory)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    keep_freed = args.keep_freed_memory == "true"
    if keep_freed:
        keep_freed_memory()
    ds = Path(args.data)
    layouts = args.layouts.split(",")
    if unknown := [x for x in layouts if x not in LAYOUTS]:
        p.error(f"unknown layout(s) {unknown}; choose from {list(LAYOUTS)}")
    if not (ds / SEMANTIC_IDS).is_file():
        layouts = [x for x in layouts if not LAYOUTS[x][0]]
    raw_scan(ds, args.split)  # warm the page cache so both sides read from memory
    # The machine may be shared and its speed drifts between processes and minutes: the
    # repeats are rounds, each running the raw scans and then every reader configuration, so
    # each reader run has raw scans from its own round to be compared with (the paired
    # ratios; their median is the steadier figure). Per configuration also the best-of-N
    # wall time and CPU time (for workers=0 the reader's whole cost).
    if bad := [x for x in args.read_ahead.split(",") if x not in ("true", "false")]:
        p.error(f"--read-ahead takes true/false, got {bad}")
    aheads = [x == "true" for x in args.read_ahead.split(",")]
    configs = [(int(x), y, a) for x in args.workers.split(",") for y in layouts for a in aheads]
    sizes = {x: batch_bytes(ds, args.split, args.batch_size, x) for x in layouts}
    floors: dict[str, list[tuple[float, float]]] = {x: [] for x in layouts}
    scans: dict[str, list[tuple[int, float, float]]] = {name: [] for name in SCANS}
    runs: dict[tuple[int, str, bool], list[tuple[int, float, float]]] = {c: [] for c in configs}
    for _ in range(args.repeats):
        # raw_pyarrow_scan (row group by row group, each opened afresh) is the ratio the
        # bench has always reported; the others are stricter: open_once keeps files open as
        # the reader does, read_table / iter_batches read whole files
        for name, scan in SCANS.items():
            scans[name].append(scan(ds, args.split))
        for layout in layouts:
            floors[layout].append(write_floor(sizes[layout]))
        for w, layout, ahead in configs:
            runs[w, layout, ahead].append(reader_scan(ds, args.split, args.batch_size, w, layout,
                                                      args.bucket_window, keep_freed, ahead,
                                                      args.shuffle_block))
    raws, once = scans["raw_pyarrow_scan"], scans["raw_pyarrow_scan_open_once"]
    rows = raws[0][0]
    for name, rs in scans.items():
        if any(r[0] != rows for r in rs):
            raise SystemExit(f"{name} read {[r[0] for r in rs]} rows, the split has {rows}")
        wall, cpu = min(r[1] for r in rs), min(r[2] for r in rs)
        print(json.dumps({"bench": name, "rows": rows, "seconds": round(wall, 3),
                          "rows_per_s": round(rows / wall), "cpu_seconds": round(cpu, 3),
                          "rows_per_cpu_s": round(rows / cpu)}), flush=True)
    for layout, fl in floors.items():
        # the best ratio to the strictest scan that a reader writing these batches could reach
        strictest = [min(v[i][1] for v in scans.values()) for i in range(args.repeats)]
        print(json.dumps({"bench": "write_floor", "layout": layout,
                          "batch_size": args.batch_size, "rows": rows,
                          "bytes": sum(sizes[layout]),
                          "bytes_per_row": round(sum(sizes[layout]) / rows, 1),
                          "seconds": round(min(f[0] for f in fl), 4),
                          "ratio_strictest_scan_to_floor_paired_median": round(
                              statistics.median(a / f[0] for a, f in zip(strictest, fl,
                                                                          strict=True)), 3)}),
              flush=True)
    strictest_wall = min(min(r[1] for r in v) for v in scans.values())
    for layout in layouts:
        # the best ratio to the strictest scan that the reader's work (or only its compiled
        # part) could reach if perfectly split over two threads, as the scans are
        st = stage_costs(ds, args.split, args.batch_size, layout, max(args.repeats, 3))
        work = st["read"] + st["decode"] + st["assemble"]
        least = st["read"] + st["decode"] + st["compiled"]
        print(json.dumps({"bench": "reader_stages", "layout": layout,
                          "batch_size": args.batch_size, "rows": rows,
                          **{f"{k}_cpu_seconds": round(st[k], 6)
                             for k in ("read", "decode", "assemble", "compiled")},
                          "assemble_us_per_batch": round(st["assemble"] / st["batches"] * 1e6, 1),
                          "compiled_us_per_batch": round(st["compiled"] / st["batches"] * 1e6, 1),
                          "strictest_scan_seconds": round(strictest_wall, 6),
                          "ratio_bound_two_threads": round(strictest_wall / (work / 2), 3),
                          "ratio_bound_compiled_two_threads": round(
                              strictest_wall / (least / 2), 3)}), flush=True)
    raw_wall, raw_cpu = min(r[1] for r in raws), min(r[2] for r in raws)
    once_wall, once_cpu = min(r[1] for r in once), min(r[2] for r in once)
    for (w, layout, ahead), rs in runs.items():
        if any(r[0] != rows for r in rs):  # a throughput over lost rows means nothing
            raise SystemExit(f"reader yielded {[r[0] for r in rs]} rows, the split has {rows}")
        wall, cpu = min(r[1] for r in rs), min(r[2] for r in rs)
        line = {"bench": "reader_with_batches", "workers": w, "layout": layout,
                "read_ahead": ahead,
                "batch_size": args.batch_size, "bucket_window": args.bucket_window,
                "shuffle_block": args.shuffle_block,
                "keep_freed_memory": keep_freed,
                "rows": rows, "seconds": round(wall, 3), "rows_per_s": round(rows / wall),
                "ratio_to_raw": round(raw_wall / wall, 3),
                "ratio_to_raw_open_once": round(once_wall / wall, 3),
                "ratio_to_raw_paired_median": _median_ratio(raws, rs, 1),
                "ratio_to_raw_paired": [round(a[1] / b[1], 3)
                                        for a, b in zip(raws, rs, strict=True)],
                # the same paired median against every plain scan, and the strictest of them
                "ratio_paired_median_by_scan": {n: _median_ratio(v, rs, 1)
                                                for n, v in scans.items()}}
        line["ratio_paired_median_strictest"] = min(line["ratio_paired_median_by_scan"].values())
        if w == 0:
            line.update(cpu_seconds=round(cpu, 3), rows_per_cpu_s=round(rows / cpu),
                        cpu_ratio_to_raw=round(raw_cpu / cpu, 3),
                        cpu_ratio_to_raw_open_once=round(once_cpu / cpu, 3),
                        cpu_ratio_to_raw_paired_median=_median_ratio(raws, rs, 2),
                        cpu_ratio_to_raw_paired=[round(a[2] / b[2], 3)
                                                 for a, b in zip(raws, rs, strict=True)])
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
