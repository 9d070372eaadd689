"""TorchX components for genci-dist (the app itself never imports torchx).

    torchx run launchers/components.py:train --config configs/ml100k.toml --nproc_per_node 2
    torchx run launchers/components.py:train --nnodes 2 --nproc_per_node 1 -- --train.lr 0.001
    torchx run -s slurm --dryrun launchers/components.py:train --nnodes 2 --nproc_per_node 8

Every extra argument after `--` is passed to the trainer as a dotted config override.

Restarts: the role's environment is torchrun's (the agent's) environment, and this component
sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 there. Without it, torchrun's workers share the
agent's rendezvous TCP store, and after a restart (torchrun --max-restarts, e.g. a rank that
was killed) the new ranks read the dead ranks' gloo addresses from it and die in
init_process_group ("Gloo connectFullMesh failed ... Connection refused";
pytorch/pytorch#135712). With it the restarted ranks resume from the last checkpoint. Using
`torchx run dist.ddp` directly: `--env TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` (.torchxconfig
sets it as dist.ddp's default env).
"""


import torchx.specs as specs
from torchx.components import dist


def train(
    *overrides: str,
    config: str = "configs/ml100k.toml",
    dataset: str = "",
    nnodes: int = 1,
    nproc_per_node: int = 2,
    image: str = "ghcr.io/pytorch/torchx:0.7.0",
    cpu: int = 2,
    memMB: int = 8192,
    gpu: int = 0,
    max_retries: int = 0,
    max_restarts: int = 0,
    rdzv_port: int = 29500,
) -> specs.AppDef:
    """Trains a GenCI-family model with torchrun on nnodes x nproc_per_node ranks.

    Args:
        overrides: dotted config overrides passed to genci_dist/train.py (`--train.lr 0.001`)
        config: TOML config under configs/
        dataset: prepared dataset folder (overrides data.dir when given)
        nnodes: number of nodes (hosts)
        nproc_per_node: ranks per node
        image: container image (remote schedulers; local_cwd ignores it)
        cpu: CPUs per node (remote schedulers)
        memMB: memory per node in MB (remote schedulers)
        gpu: GPUs per node; when > 0 the trainer picks CUDA + nccl at run time
        max_retries: scheduler retries of the whole job (Slurm, Kubernetes; torchx's local
            schedulers do not retry); the trainer resumes from its last checkpoint
        max_restarts: torchrun's in-place restarts of the workers when a rank dies (any
            scheduler, local_cwd included); the restarted ranks resume from the last checkpoint
        rdzv_port: c10d rendezvous port
    """
    args = ["--config", config]
    if dataset:
        args += ["--data.dir", dataset]
    args += list(overrides)
    app = dist.ddp(
        *args,
        script="genci_dist/train.py",
        image=image,
        name="genci",
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=f"{nnodes}x{nproc_per_node}",
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
             # restarted ranks rendezvous on a fresh store (see the module docstring)
             "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"},
    )
    if max_restarts:  # dist.ddp has no knob for it: its role runs `bash -c "torchrun ..."`
        role = app.roles[0]
        role.args = [a.replace("torchrun ", f"torchrun --max-restarts {max_restarts} ", 1)
                     if a.startswith("torchrun ") else a for a in role.args]
    return app


def prepare(
    *args: str,
    nnodes: int = 1,
    nproc_per_node: int = 2,
    image: str = "ghcr.io/pytorch/torchx:0.7.0",
    cpu: int = 2,
    memMB: int = 8192,
    rdzv_port: int = 29500,
) -> specs.AppDef:
    """The partitioned, out-of-core genci-prepare on nnodes x nproc_per_node ranks
    (data_pipes/partitioned_job.py): rank 0 scans the RecBole .inter, every rank takes
    partitions rank::world, rank 0 writes the manifest. All nodes must share the
    filesystem holding --out.

        torchx run launchers/components.py:prepare --nproc_per_node 2 -- --dataset recbole \\
            --atomic-dir data/raw/x --label-rule drop-band:3-3 --partitions auto --out data/x

    Args:
        args: genci-prepare arguments (`--dataset recbole --atomic-dir DIR --out DIR ...`)
        nnodes: number of nodes (hosts)
        nproc_per_node: ranks per node
        image: container image (remote schedulers; local_cwd ignores it)
        cpu: CPUs per node (remote schedulers)
        memMB: memory per node in MB (remote schedulers)
        rdzv_port: c10d rendezvous port
    """
    return dist.ddp(
        *args,
        m="data_pipes.partitioned_job",
        image=image,
        name="genci-prepare",
        cpu=cpu,
        memMB=memMB,
        j=f"{nnodes}x{nproc_per_node}",
        rdzv_port=rdzv_port,
        env={"OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"},
    )
