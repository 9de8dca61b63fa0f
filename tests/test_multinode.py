"""Two "nodes" on one machine: two train.py processes rendezvous over TCP and train ONE model.

This is the launch of docs/multigpu.md "Several machines" (one command per node, ranks from
NODE_RANK / MASTER_ADDR / MASTER_PORT / WORLD_SIZE), with ``trainer=multinode_cpu`` (one
CPU process per node, DDP over gloo) instead of GPUs. A callback defined here
(:class:`RankProbe`, added through the ``callbacks`` config group) makes each rank write what
it saw: world size, ranks, and a hash of its weights after fit.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from conftest import ROOT, TINY_SEG, read_summary

pytestmark = pytest.mark.slow

TIMEOUT_S = 240  # a hang (a node that never joins) fails the test instead of blocking CI


def weights_sha256(named_tensors) -> str:
    """sha256 over (name, bytes) of the trainable weights, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class RankProbe(Callback):
    """Writes ``rank<global_rank>.json``: ranks, world size, steps and the sha256 of the weights.

    Parameters only: BatchNorm running statistics are buffers, which each process updates from
    its own last batch (SyncBatchNorm is GPU-only).
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_fit_end(self, trainer, pl_module) -> None:
        record = {
            "global_rank": trainer.global_rank, "node_rank": trainer.node_rank, "local_rank": trainer.local_rank,
            "world_size": trainer.world_size, "num_nodes": trainer.num_nodes,
            "dist_world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else None,
            "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
            "global_step": trainer.global_step,
            "weights_sha256": weights_sha256(pl_module.named_parameters()),
            "parameter_names": [name for name, _ in pl_module.named_parameters()],
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_cpu_nodes_train_one_model(tmp_path):
    probe_dir = tmp_path / "probe"
    port = free_port()
    overrides = TINY_SEG + [
        "trainer=multinode_cpu", "trainer.num_nodes=2", "eval_untrained=false", "test=false",
        "callbacks.validation_panels=null",
        "+callbacks.rank_probe._target_=test_multinode.RankProbe", f"+callbacks.rank_probe.out_dir={probe_dir}",
        f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path / 'logs'}",
    ]
    base_env = {k: v for k, v in os.environ.items()
                if k not in ("RANK", "LOCAL_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "SLURM_JOB_ID",
                             "SLURM_NTASKS", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE")}
    base_env.update({"WANDB_MODE": "disabled", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
                     "MEDMARK_DIST_TIMEOUT_S": "120"})
    procs, logs = [], []
    for node in (0, 1):
        log = open(tmp_path / f"node{node}.log", "w")
        logs.append(log)
        cmd = [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={tmp_path / f'node{node}'}"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env={**base_env, "NODE_RANK": str(node)},
                                      stdout=log, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    outputs = [(tmp_path / f"node{node}.log").read_text()[-3000:] for node in (0, 1)]
    for node, proc in enumerate(procs):
        assert proc.returncode == 0, f"node {node} exited with {proc.returncode}:\n{outputs[node]}"

    ranks = {r: json.loads((probe_dir / f"rank{r}.json").read_text()) for r in (0, 1)}
    for rank, record in ranks.items():
        assert record["global_rank"] == rank and record["node_rank"] == rank and record["local_rank"] == 0
        assert record["world_size"] == record["dist_world_size"] == 2 and record["num_nodes"] == 2
        assert record["backend"] == "gloo"
    # one model: DDP kept the weights identical on both nodes, after the same number of steps
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] > 0

    # only global rank 0 writes the run's outputs
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    summary = read_summary(node0)
    assert (node0 / "checkpoints" / "last.ckpt").is_file()
    assert not (node1 / "summary.json").exists()
    assert not (node1 / "checkpoints").exists()
    # each node trains on half of the training set (DistributedSampler; batch 4, one epoch)
    assert summary["global_step"] == ranks[0]["global_step"]
    assert summary["global_step"] == math.ceil(math.ceil(summary["data"]["num_train"] / 2) / 4)
    # the checkpoint holds the weights both ranks ended with
    state = torch.load(node0 / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert weights_sha256((k, state[k]) for k in ranks[0]["parameter_names"]) == ranks[0]["weights_sha256"]
