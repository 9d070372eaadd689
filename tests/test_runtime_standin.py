"""The runtime core on a model it knows nothing about: a stand-in with an EmbeddingBagCollection
of 3 tables, an EmbeddingCollection and an MLP, sharded by `build_dmp` with per-table overrides
(table-wise, row-wise, table-row-wise, column-wise — row-wise kinds being the CPU re-opened
ones), trained by `build_optimizer` (fused sparse optimizer + dense Adam) under
`build_lr_scheduler` (warmup then cosine), in real gloo processes at world 1 and world 2.

The reference is independent of TorchRec's sharding: the same plain module in float64, the
global-batch mean loss, and the sparse updates written out by hand (SGD, Adagrad, row-wise
Adagrad as fbgemm's EXACT_* kernels define them), the dense part by torch Adam at the
hand-computed schedule factors. Weights leave the workers through DCP and come back into the
plain module through `load_model_only` (so the checkpoint path is exercised too)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from genci_dist.runtime.checkpoint import load_model_only

GLOBAL_BATCH = 8
STEPS = 4
DENSE_LR = 0.05
SPARSE_LR = 0.3
EPS = 1e-8
WARMUP, TOTAL = 2, 4
# LambdaLR factor of step i: warmup (i+1)/2 for i < 2, then 0.5(1+cos(pi (i-2)/2)).
SCHEDULE = [0.5, 1.0, 1.0, 0.5]
# float32 workers vs a float64 reference over 4 steps: measured max |Δw| ≤ 4e-7 and max |Δloss|
# ≤ 1e-7 in every case at both world sizes, while every table moved by ≥ 5e-3 (the wrong
# optimizer, lr or gradient averaging is off by that order).
TOL = 1e-5

# (sparse optimizer, default sharding, per-table overrides); t_cat is 16 wide so column-wise
# really splits it across two ranks (min_partition 8). Column-wise is kept to SGD: row-wise
# Adagrad keeps one momentum per column shard, which is not the unsharded update.
CASES: list[tuple[str, str, dict[str, str]]] = [
    ("sgd", "table_wise", {"t_item": "row_wise", "t_user": "table_row_wise",
                           "t_hist": "row_wise", "t_cat": "column_wise"}),
    ("rowwise_adagrad", "row_wise", {"t_user": "table_wise", "t_hist": "row_wise"}),
    ("adagrad", "table_row_wise", {"t_item": "table_wise", "t_hist": "column_wise"}),
]


class StandIn(nn.Module):
    """user, item: one id each; cat: 0–2 ids (summed); hist: 0–4 ids through an
    EmbeddingCollection, averaged per sample. logits (B,) = MLP([user|item|cat|hist])."""

    def __init__(self, device: torch.device | None = None) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(device=device, tables=[
            EmbeddingBagConfig(name="t_user", embedding_dim=8, num_embeddings=40,
                               feature_names=["user"]),
            EmbeddingBagConfig(name="t_item", embedding_dim=8, num_embeddings=30,
                               feature_names=["item"]),
            EmbeddingBagConfig(name="t_cat", embedding_dim=16, num_embeddings=12,
                               feature_names=["cat"])])
        self.ec = EmbeddingCollection(device=device, tables=[
            EmbeddingConfig(name="t_hist", embedding_dim=8, num_embeddings=30,
                            feature_names=["hist"])])
        self.mlp = nn.Sequential(nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, sparse: KeyedJaggedTensor, seq: KeyedJaggedTensor) -> torch.Tensor:
        # by key: a sharded EBC groups its output by sharding type, so .values() is reordered
        kt = self.ebc(sparse).to_dict()
        pooled = torch.cat([kt["user"], kt["item"], kt["cat"]], dim=1)   # (B, 32)
        hist = self.ec(seq)["hist"]
        lengths = hist.lengths()
        b = lengths.numel()
        owner = torch.repeat_interleave(torch.arange(b), lengths)
        summed = torch.zeros(b, 8, dtype=pooled.dtype).index_add_(
            0, owner, hist.values().to(pooled.dtype))
        mean = summed / lengths.clamp(min=1).unsqueeze(1).to(pooled.dtype)  # (B, 8)
        return self.mlp(torch.cat([pooled, mean], dim=1)).squeeze(1)


def _kjt(keys: list[str], rows: list[list[list[int]]]) -> KeyedJaggedTensor:
    """rows[b][k] = ids of key k in sample b → KJT (key-major layout)."""
    values = [i for k in range(len(keys)) for r in rows for i in r[k]]
    lengths = [len(r[k]) for k in range(len(keys)) for r in rows]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.tensor(values, dtype=torch.int64),
        lengths=torch.tensor(lengths, dtype=torch.int64))


def _batches() -> list[dict[str, list]]:
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        rows, hist, labels = [], [], []
        for _b in range(GLOBAL_BATCH):
            n_cat = int(torch.randint(0, 3, (1,), generator=g))
            n_hist = int(torch.randint(0, 5, (1,), generator=g))
            # few distinct ids, so rows repeat inside a batch (exact kernels must sum them)
            rows.append([[int(torch.randint(0, 6, (1,), generator=g))],
                         [int(torch.randint(0, 5, (1,), generator=g))],
                         torch.randint(0, 12, (n_cat,), generator=g).tolist()])
            hist.append([torch.randint(0, 8, (n_hist,), generator=g).tolist()])
            labels.append(float(torch.randint(0, 2, (1,), generator=g)))
        out.append({"rows": rows, "hist": hist, "labels": labels})
    return out


def _inputs(batch: dict[str, list], lo: int, hi: int
            ) -> tuple[KeyedJaggedTensor, KeyedJaggedTensor, torch.Tensor]:
    return (_kjt(["user", "item", "cat"], batch["rows"][lo:hi]),
            _kjt(["hist"], batch["hist"][lo:hi]), torch.tensor(batch["labels"][lo:hi]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, init_dir: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    from genci_dist.runtime.checkpoint import load_model_sharded
    from genci_dist.runtime.distributed import DistEnv
    from genci_dist.runtime.sharding import (
        ShardingConfig,
        build_dmp,
        build_lr_scheduler,
        build_optimizer,
        plan_to_dict,
    )

    env = DistEnv.init("cpu", require_pg=True)
    try:
        batches = _batches()
        per = GLOBAL_BATCH // world
        for i, (opt_name, default, tables) in enumerate(CASES):
            cfg = ShardingConfig(default_type=default, tables=tables,  # type: ignore[arg-type]
                                 sparse_optimizer=opt_name,  # type: ignore[arg-type]
                                 sparse_lr=SPARSE_LR, sparse_eps=EPS)
            torch.manual_seed(100 + rank)  # DMP's own init must not matter: weights are loaded
            model = StandIn(device=torch.device("meta"))
            dmp, plan = build_dmp(model, env, cfg)
            load_model_sharded(dmp, init_dir)
            opt = build_optimizer(dmp, DENSE_LR)
            sched = build_lr_scheduler(opt, WARMUP, TOTAL, "cosine")
            losses = []
            for batch in batches:
                sparse, seq, labels = _inputs(batch, rank * per, (rank + 1) * per)
                opt.zero_grad()
                loss = nn.functional.binary_cross_entropy_with_logits(dmp(sparse, seq), labels)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(env.all_reduce_sum(loss.detach().clone())) / world)
            dcp.save({"model": dmp.state_dict()}, checkpoint_id=f"{out_dir}/case{i}",
                     process_group=env.pg)
            if rank == 0:
                Path(f"{out_dir}/case{i}.json").write_text(json.dumps(
                    {"losses": losses, "plan": plan_to_dict(plan)}))
            env.barrier()
    finally:
        env.destroy()


def _plain_forward(model: StandIn, batch: dict[str, list]) -> torch.Tensor:
    """StandIn's forward written with plain indexing (TorchRec's EBC/EC return float32 whatever
    their weights are, and the reference should not reuse the code it checks)."""
    w = {n.split(".")[-2]: p for n, p in model.named_parameters() if not n.startswith("mlp.")}
    feats = []
    for (user, item, cat), (hist,) in zip(batch["rows"], batch["hist"], strict=True):
        parts = [w["t_user"][user].sum(0), w["t_item"][item].sum(0), w["t_cat"][cat].sum(0),
                 w["t_hist"][hist].sum(0) / max(1, len(hist))]
        feats.append(torch.cat(parts))
    return model.mlp(torch.stack(feats)).squeeze(1)                    # (B,)


def _reference(init: StandIn, opt_name: str) -> tuple[StandIn, list[float]]:
    """float64 plain-module training on whole global batches with hand-written sparse updates."""
    model = StandIn().double()
    model.load_state_dict(init.state_dict())
    tables = {n: p for n, p in model.named_parameters() if not n.startswith("mlp.")}
    dense = [p for n, p in model.named_parameters() if n.startswith("mlp.")]
    adam = torch.optim.Adam(dense, lr=DENSE_LR)
    acc = {n: torch.zeros_like(p) if opt_name == "adagrad" else torch.zeros(p.shape[0], 1,
                                                                            dtype=p.dtype)
           for n, p in tables.items()}
    losses = []
    for step, batch in enumerate(_batches()):
        model.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(
            _plain_forward(model, batch), torch.tensor(batch["labels"], dtype=torch.float64))
        loss.backward()
        losses.append(float(loss.detach()))
        with torch.no_grad():
            for n, p in tables.items():
                g = p.grad
                if opt_name == "sgd":
                    p -= SPARSE_LR * g
                elif opt_name == "adagrad":         # G += g²; w -= lr g / (√G + eps)
                    acc[n] += g * g
                    p -= SPARSE_LR * g / (acc[n].sqrt() + EPS)
                else:                               # one G per row: G += mean_d g²
                    acc[n] += (g * g).mean(dim=1, keepdim=True)
                    p -= SPARSE_LR * g / (acc[n].sqrt() + EPS)
            for group in adam.param_groups:
                group["lr"] = DENSE_LR * SCHEDULE[step]
        adam.step()
    return model, losses


def _max_diff(a: nn.Module, b: nn.Module) -> dict[str, float]:
    sb = b.state_dict()
    return {k: float((v.double() - sb[k].double()).abs().max()) for k, v in a.state_dict().items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, StandIn]:
    """The initial weights (a DCP checkpoint of a plain module) and the worker outputs for
    world 1 and world 2."""
    root = tmp_path_factory.mktemp("standin")
    torch.manual_seed(0)
    init = StandIn()
    with torch.no_grad():   # torchrec's default init is tiny; spread the tables out
        for n, p in init.named_parameters():
            if not n.startswith("mlp."):
                p.uniform_(-0.5, 0.5)
    dcp.save({"model": init.state_dict()}, checkpoint_id=str(root / "init"))
    for world in (1, 2):
        out = root / f"w{world}"
        out.mkdir()
        mp.spawn(_worker, args=(world, _free_port(), str(root / "init"), str(out)),
                 nprocs=world, join=True)
    return root, init


def _trained(root: Path, world: int, case: int) -> tuple[StandIn, dict]:
    model = StandIn().double()
    load_model_only(model, root / f"w{world}" / f"case{case}")
    return model, json.loads((root / f"w{world}" / f"case{case}.json").read_text())


def test_schedule_factors_are_warmup_then_cosine() -> None:
    """build_lr_scheduler scales only the dense lr by the hand-computed factors."""
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

    from genci_dist.runtime.sharding import build_lr_scheduler

    lin = nn.Linear(2, 1)
    dense = KeyedOptimizerWrapper(dict(lin.named_parameters()),
                                  lambda ps: torch.optim.SGD(ps, lr=DENSE_LR))
    sched = build_lr_scheduler(CombinedOptimizer([("dense", dense)]), WARMUP, TOTAL, "cosine")
    seen = []
    for _ in range(STEPS + 1):
        seen.append(dense.param_groups[0]["lr"] / DENSE_LR)
        sched.step()
    assert seen == pytest.approx(SCHEDULE + [0.0], abs=1e-12)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_sharded_training_equals_hand_updates_at_world_1_and_2(
        runs: tuple[Path, StandIn], case: int) -> None:
    """Every weight and every step's global loss at world 1 and world 2 equals the float64
    hand-update reference, so the configured sparse optimizer and lr are what fbgemm applies,
    DMP/DDP average gradients over ranks, and the LR schedule reaches the dense Adam."""
    root, init = runs
    opt_name = CASES[case][0]
    ref, ref_losses = _reference(init, opt_name)
    for world in (1, 2):
        model, info = _trained(root, world, case)
        diffs = _max_diff(model, ref)
        assert max(diffs.values()) < TOL, (world, opt_name, diffs)
        assert info["losses"] == pytest.approx(ref_losses, abs=TOL)
    # the test can fail: the tables really moved, and another optimizer's result is far away
    moved = _max_diff(init, ref)
    assert min(moved[k] for k in moved if not k.startswith("mlp.")) > 1e-3
    other, _ = _reference(init, "sgd" if opt_name != "sgd" else "adagrad")
    assert max(_max_diff(other, ref).values()) > 1e-2


def test_plan_honours_per_table_overrides_on_cpu(runs: tuple[Path, StandIn]) -> None:
    """The CPU sharders offer row-wise and table-row-wise for both EBC and EC; per-table
    overrides and the default land in the plan, column-wise splits the 16-wide table."""
    root, _ = runs
    for case, (_opt, default, tables) in enumerate(CASES):
        plan = json.loads((root / "w2" / f"case{case}.json").read_text())["plan"]
        got = {t: p["sharding_type"] for m in plan.values() for t, p in m.items()}
        want = {t: tables.get(t, default) for t in ("t_user", "t_item", "t_cat", "t_hist")}
        assert got == want
        assert set(plan) == {"ebc", "ec"}
        for t, p in ((t, p) for m in plan.values() for t, p in m.items()):
            if got[t] == "row_wise":
                assert p["ranks"] == [0, 1], (t, p)
                assert len(p["shards"]) == 2
    cw = json.loads((root / "w2" / "case0.json").read_text())["plan"]["ebc"]["t_cat"]
    assert [s["sizes"] for s in cw["shards"]] == [[12, 8], [12, 8]]


def test_bad_sharding_requests_fail_with_a_clear_message() -> None:
    """EC tables cannot be table-row-wise (TorchRec has no such EC sharding), unknown tables and
    fused optimizers the CPU kernels lack are refused up front, naming the setting."""
    from genci_dist.runtime.sharding import ShardingConfig, build_constraints, fused_params

    model = StandIn(device=torch.device("meta"))
    with pytest.raises(ValueError, match=r"sharding.default_type = 'table_row_wise'.*t_hist"):
        build_constraints(model, ShardingConfig(default_type="table_row_wise"))
    with pytest.raises(ValueError, match=r"sharding.tables.t_hist = 'table_row_wise'"):
        build_constraints(model, ShardingConfig(tables={"t_hist": "table_row_wise"}))
    with pytest.raises(ValueError, match=r"unknown table\(s\) \['t_nope'\]"):
        build_constraints(model, ShardingConfig(tables={"t_nope": "row_wise"}))
    with pytest.raises(ValueError, match="is not one of"):
        ShardingConfig(tables={"t_user": "diagonal"})
    with pytest.raises(ValueError, match=r"'adam'.*CPU kernels fuse only"):
        fused_params(ShardingConfig(sparse_optimizer="adam"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"sharding.default_type = 'data_parallel'.*t_hist.*"
                                         r"pools each bag on cpu"):
        build_constraints(model, ShardingConfig(default_type="data_parallel"))
    assert build_constraints(model, ShardingConfig(default_type="data_parallel"),
                             "cuda")["t_hist"].sharding_types == ["data_parallel"]
    ok = build_constraints(model, ShardingConfig(default_type="table_row_wise",
                                                 tables={"t_hist": "row_wise"}))
    assert {t: c.sharding_types for t, c in ok.items()} == {
        "t_user": ["table_row_wise"], "t_item": ["table_row_wise"],
        "t_cat": ["table_row_wise"], "t_hist": ["row_wise"]}


_DP_EC = """
import os, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
dist.init_process_group("gloo", rank=0, world_size=1)
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
class Sharder(EmbeddingCollectionSharder):
    def sharding_types(self, device_type):
        return ["data_parallel"]
ec = EmbeddingCollection(tables=[EmbeddingConfig(name="t", embedding_dim=4, num_embeddings=10,
                                                 feature_names=["f"])], device=torch.device("meta"))
planner = EmbeddingShardingPlanner(topology=Topology(world_size=1, compute_device="cpu"),
    constraints={"t": ParameterConstraints(sharding_types=["data_parallel"],
                                           compute_kernels=["dense"])})
plan = planner.collective_plan(ec, [Sharder()], dist.GroupMember.WORLD)
dmp = DistributedModelParallel(ec, device=torch.device("cpu"), plan=plan, sharders=[Sharder()])
kjt = KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=torch.tensor([1, 2, 3, 4, 5, 6]),
                                          lengths=torch.tensor([3, 1, 2]))
try:
    print("rows", dmp(kjt)["f"].values().shape[0])
except RuntimeError as e:
    print("error", str(e).splitlines()[0])
"""


def test_data_parallel_embedding_collection_still_pools_on_cpu() -> None:
    """Why sharding.ec_types leaves data_parallel out on CPU: a data_parallel EC looked up with
    6 ids in 3 bags gives 3 rows (one per bag) instead of 6, and TorchRec's split fails. When
    a TorchRec/fbgemm upgrade fixes the kernel this test fails: let EC tables be
    data_parallel on CPU again."""
    import subprocess
    import sys

    got = subprocess.run([sys.executable, "-c", _DP_EC], capture_output=True, text=True,
                         env={**os.environ, "PORT": str(_free_port())}, timeout=300)
    last = got.stdout.strip().splitlines()[-1] if got.stdout.strip() else got.stderr[-2000:]
    assert last.startswith("error split_with_sizes expects split_sizes to sum exactly to 3"), \
        last
