"""Which engine for the out-of-core heavy lifting of prepare: one job, three engines, JSON lines.

    python -m data_pipes.bench_engines --inter RAW/synth.inter [--engines pyarrow,duckdb,polars]
        [--partitions 8] [--memory-limit-gb 1] [--threads 2]

The job is the part of prepare whose cost grows with the interactions: read a raw RecBole
`.inter` (user, item, rating, timestamp; tab-separated), apply the MovieLens label rule (drop
rating 3, label = rating > 3), and write one row per user with the user's items, labels and
timestamps ordered by (timestamp, item id) — the per-user sequence every protocol step starts
from. Engines:

    pyarrow  what data_pipes.partitioned does: pyarrow's streaming CSV reader hashes each block's
             users into P Parquet files; each partition is then sorted with numpy (lexsort) and
             its users' lists cut with offsets (pyarrow + numpy, no engine).
    duckdb   one SQL statement (GROUP BY user with list(... ORDER BY timestamp, item)), with
             DuckDB's memory_limit and spilling to a temp folder.
    polars   the same as a lazy query run by the streaming engine (sink_parquet).

Each line: engine, wall and CPU seconds, the process's peak RSS (VmHWM: each engine runs in its
own subprocess), users, interactions kept, and a checksum of the result (sum over users of a
hash of their sequence) that must agree across engines. duckdb and polars are not project
dependencies: run this in a venv that has them (`pip install duckdb polars pyarrow numpy`);
an engine that is not installed is reported as such.

Measured 2026-12-05 (1 thread each, machine shared, load 2.4-5; duckdb 2.0.1, polars 2.1.0;
raw files from data_pipes.raw_inter.write_raw_synthetic, seed 2024):

    s = 10, 4.23M kept interactions:  pyarrow 2.81 CPU s, 0.40 GB; duckdb 3.20 s, 0.60 GB;
                                      polars 2.82 s, 0.48 GB (checksums equal)
    s = 100, 42.3M kept:              pyarrow 26.97 CPU s, 1.21 GB; polars 26.33 s, 3.02 GB;
                                      duckdb out of memory at memory_limit 1 GB (its ordered
                                      list aggregate does not spill)

So the prepare keeps pyarrow + numpy: the same CPU as Polars' streaming engine at 40 % of its
memory, bounded by the partition size, where DuckDB's ordered list aggregate needed more than
the 1 GB it was given.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

COLS = ["user", "item", "rating", "ts"]


def _read_options():  # noqa: ANN202
    import pyarrow.csv as pacsv

    return (pacsv.ReadOptions(column_names=COLS, skip_rows=1, block_size=1 << 24),
            pacsv.ParseOptions(delimiter="\t"),
            pacsv.ConvertOptions(column_types={"user": pa.int64(), "item": pa.int64(),
                                               "rating": pa.float64(), "ts": pa.int64()}))


def run_pyarrow(inter: Path, out: Path, work: Path, partitions: int) -> None:
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    read, parse, convert = _read_options()
    writers: dict[int, pq.ParquetWriter] = {}
    with pacsv.open_csv(inter, read_options=read, parse_options=parse,
                        convert_options=convert) as reader:
        for batch in reader:
            keep = pc.not_equal(batch.column("rating"), 3.0)
            b = batch.filter(keep)
            user = b.column("user").to_numpy()
            # hash by user (a multiplicative hash in uint64, wrapping)
            part = ((user.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)) \
                % np.uint64(partitions)
            for k in np.unique(part):
                sel = pa.array(np.flatnonzero(part == k))
                t = pa.Table.from_batches([b]).take(sel)
                if k not in writers:
                    writers[int(k)] = pq.ParquetWriter(work / f"p{k}.parquet", t.schema)
                writers[int(k)].write_table(t)
    for w in writers.values():
        w.close()
    out_writer = None
    for k in sorted(writers):
        t = pq.read_table(work / f"p{k}.parquet")
        u, i, r, ts = (t.column(c).to_numpy() for c in COLS)
        order = np.lexsort((i, ts, u))
        u, i, lab, ts = u[order], i[order], (r[order] > 3).astype(np.int8), ts[order]
        starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
        offsets = pa.array(np.r_[starts, u.size].astype(np.int32))
        table = pa.table({"user": u[starts],
                          "items": pa.ListArray.from_arrays(offsets, pa.array(i)),
                          "labels": pa.ListArray.from_arrays(offsets, pa.array(lab)),
                          "timestamps": pa.ListArray.from_arrays(offsets, pa.array(ts))})
        if out_writer is None:
            out_writer = pq.ParquetWriter(out, table.schema)
        out_writer.write_table(table)
        (work / f"p{k}.parquet").unlink()
    if out_writer is not None:
        out_writer.close()


def run_duckdb(inter: Path, out: Path, work: Path, memory_gb: float, threads: int) -> None:
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET memory_limit = '{memory_gb}GB'")
    con.execute(f"SET temp_directory = '{work}'")
    con.execute(f"SET threads = {threads}")
    con.execute("SET preserve_insertion_order = false")
    con.execute(f"""
        COPY (
          SELECT "user", list(item ORDER BY ts, item) AS items,
                 list((rating > 3)::TINYINT ORDER BY ts, item) AS labels,
                 list(ts ORDER BY ts, item) AS timestamps
          FROM read_csv('{inter}', delim='\t', header=true,
                        columns={{'user': 'BIGINT', 'item': 'BIGINT', 'rating': 'DOUBLE',
                                  'ts': 'BIGINT'}})
          WHERE rating <> 3
          GROUP BY "user"
        ) TO '{out}' (FORMAT parquet)""")


def run_polars(inter: Path, out: Path, threads: int) -> None:
    os.environ["POLARS_MAX_THREADS"] = str(threads)
    import polars as pl

    lf = (pl.scan_csv(inter, separator="\t", has_header=True, new_columns=COLS,
                      schema_overrides={"user": pl.Int64, "item": pl.Int64,
                                        "rating": pl.Float64, "ts": pl.Int64})
          .filter(pl.col("rating") != 3)
          .with_columns((pl.col("rating") > 3).cast(pl.Int8).alias("label"))
          .sort(["user", "ts", "item"])
          .group_by("user", maintain_order=True)
          .agg(pl.col("item").alias("items"), pl.col("label").alias("labels"),
               pl.col("ts").alias("timestamps")))
    try:
        lf.sink_parquet(out)
    except Exception:  # noqa: BLE001 - a query the streaming engine cannot sink
        lf.collect(engine="streaming").write_parquet(out)


def checksum(path: Path) -> dict[str, int]:
    """Users, interactions and an order-independent checksum of the per-user sequences."""
    users = inter = 0
    total = 0
    pf = pq.ParquetFile(path)
    for g in range(pf.metadata.num_row_groups):
        t = pf.read_row_group(g)
        u = t.column("user").to_numpy()
        items = t.column("items").combine_chunks()
        labels = t.column("labels").combine_chunks()
        ts = t.column("timestamps").combine_chunks()
        off = items.offsets.to_numpy()
        lens = np.diff(off)
        iv = items.values.to_numpy().astype(np.uint64)
        lv = labels.values.to_numpy().astype(np.uint64)
        tv = ts.values.to_numpy().astype(np.uint64)
        pos = (np.arange(iv.size) - np.repeat(off[:-1], lens)).astype(np.uint64)
        # the product couples each value with its position (a sum of per-field terms alone
        # would not see two items swapped), and the user
        h = ((iv * np.uint64(1000003) + lv * np.uint64(7919) + tv * np.uint64(31) + np.uint64(1))
             * (pos * np.uint64(2654435761) + np.uint64(1))
             * (np.repeat(u, lens).astype(np.uint64) | np.uint64(1)))
        total = (total + int(h.sum(dtype=np.uint64))) % (1 << 64)
        users += int(u.size)
        inter += int(iv.size)
    return {"users": users, "interactions": inter, "checksum": total}


def child(engine: str, inter: Path, partitions: int, memory_gb: float, threads: int) -> dict:
    with tempfile.TemporaryDirectory(dir=inter.parent) as tmp:
        work, out = Path(tmp), Path(tmp) / "sequences.parquet"
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        if engine == "pyarrow":
            run_pyarrow(inter, out, work, partitions)
        elif engine == "duckdb":
            run_duckdb(inter, out, work, memory_gb, threads)
        else:
            run_polars(inter, out, threads)
        wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        hwm = next(int(x.split()[1]) for x in open("/proc/self/status")
                   if x.startswith("VmHWM:"))
        return {"engine": engine, "wall_s": round(wall, 2),
                "cpu_s": round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 2),
                "peak_rss_gb": round(hwm / 2**20, 3), "out_bytes": out.stat().st_size,
                **checksum(out)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="data_pipes.bench_engines", description=__doc__)
    p.add_argument("--inter", required=True, help="a raw RecBole .inter")
    p.add_argument("--engines", default="pyarrow,duckdb,polars")
    p.add_argument("--partitions", type=int, default=8, help="pyarrow: user hash partitions")
    p.add_argument("--memory-limit-gb", type=float, default=1.0, help="duckdb memory_limit")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    inter = Path(a.inter)
    if a.child:
        print(json.dumps(child(a.child, inter, a.partitions, a.memory_limit_gb, a.threads)))
        return 0
    engines = a.engines.split(",")
    unknown = sorted(set(engines) - {"pyarrow", "duckdb", "polars"})
    if unknown:
        print(f"data_pipes.bench_engines: error: unknown engine(s) {unknown}", file=sys.stderr)
        return 2
    for engine in engines:
        try:
            __import__(engine)
        except ImportError:
            print(json.dumps({"engine": engine, "error": "not installed"}), flush=True)
            continue
        proc = subprocess.run([sys.executable, "-m", "data_pipes.bench_engines", "--inter",
                               str(inter), "--child", engine, "--partitions",
                               str(a.partitions), "--memory-limit-gb", str(a.memory_limit_gb),
                               "--threads", str(a.threads)], stdout=subprocess.PIPE, text=True,
                              check=False)
        line = (json.loads(proc.stdout) if proc.returncode == 0
                else {"engine": engine, "error": f"exit {proc.returncode}"})
        line["load1"] = round(os.getloadavg()[0], 2)
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
