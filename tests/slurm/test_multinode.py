"""slurm/*.sh across two nodes: a real 2-node cluster, each node a network namespace of its own.

Every job is `sbatch --nodes=2 slurm/<script>.sh` as a user would submit it: one launcher per
node (torchrun or the DeepSpeed launcher with --no_ssh), the rendezvous on node1, the memory
all-to-all and the dense collectives over the nodes' veth links. The references are the same
runs on one node with the same global batch (world size x per-rank batch): unshuffled data then
gives every rank the same samples at any node count, so the weights must agree, the memory rows
bit for bit.
"""
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import checkpoint_tensors, latest_dir
from tests.slurm.test_slurm import assert_completed, log_of, metric_steps, submit, wait_for_steps

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 60  # ~0.1 s each here: room to signal the job mid-run also on a faster machine


def finetune(tiny_data, tiny_pretrained, out: Path, *extra: str) -> list[str]:
    # 8 per rank x 2 ranks: the global batch of both layouts
    return [f"out_dir={out}", f"data.train={tiny_data}/new_facts", f"model.init_from={tiny_pretrained}",
            "data.batch_size=8", "logging.progress=false", *extra]


def assert_same_weights(want_dir: Path, got_dir: Path, dense_atol: float) -> None:
    """Memory rows bitwise; dense weights within `dense_atol` (0: bitwise too)."""
    want, got = checkpoint_tensors(want_dir), checkpoint_tensors(got_dir)
    assert want.keys() == got.keys()
    assert torch.equal(want["memory"], got["memory"])
    for name in want:
        assert torch.allclose(want[name], got[name], rtol=0, atol=dense_atol), (
            name, (want[name] - got[name]).abs().max().item())


def assert_spans_two_nodes(log: str, ranks_per_node: int) -> None:
    world = 2 * ranks_per_node
    assert "2 node(s)" in log and "master node1:" in log
    assert f"node 0/2 (node1): ranks 0-{ranks_per_node - 1} of {world}" in log
    assert f"node 1/2 (node2): ranks {ranks_per_node}-{world - 1} of {world}" in log


@pytest.fixture(scope="module")
def two_node_finetune(slurm_2node, tiny_data, tiny_pretrained, tmp_path_factory):
    """An uninterrupted sparse finetune, 2 nodes x 1 rank, torchrun: -> its output folder."""
    tmp = tmp_path_factory.mktemp("finetune_2node")
    info = slurm_2node.wait(submit(slurm_2node, tmp, finetune(tiny_data, tiny_pretrained, tmp / "out", f"steps={STEPS}",
                                                              "checkpoint.every=0", "logging.progress=true"),
                                   nodes=2, ranks_per_node=1))
    assert_completed(info)
    log = log_of(info)
    assert_spans_two_nodes(log, 1)
    # The job log is no terminal: plain progress lines (first and last step here), no tqdm bar.
    assert "finetune/sparse_memory step 1/" in log and f"finetune/sparse_memory step {STEPS}/{STEPS} (100%)" in log
    assert "\r" not in log
    return tmp / "out"


def test_two_node_finetune_equals_one_node(slurm_2node, two_node_finetune, tiny_data, tiny_pretrained, tmp_path):
    one = slurm_2node.wait(submit(slurm_2node, tmp_path, finetune(tiny_data, tiny_pretrained, tmp_path / "one",
                                                                  f"steps={STEPS}", "checkpoint.every=0"),
                                  nodes=1, ranks_per_node=2))
    assert_completed(one)
    assert "1 node(s) x 2" in log_of(one)
    assert metric_steps(two_node_finetune) == list(range(1, STEPS + 1))
    assert_same_weights(latest_dir(tmp_path / "one" / "checkpoints"), latest_dir(two_node_finetune / "checkpoints"), 0)


def test_two_node_deepspeed_pretrain_equals_one_node(slurm_2node, tiny_data, tmp_path):
    """The DeepSpeed launcher on each node (--no_ssh), ZeRO-1 dense weights, row-sparse memory."""
    common = ["steps=3", "data.batch_size=4", "data.shuffle=false", "dist.engine=deepspeed", "dist.zero_stage=1",
              f"data.train={tiny_data}/pretrain", "logging.progress=false"]
    runs = {}
    for nodes in (1, 2):
        info = slurm_2node.wait(submit(slurm_2node, tmp_path, [f"out_dir={tmp_path}/n{nodes}", *common],
                                       script="slurm/pretrain.sh", nodes=nodes, ranks_per_node=2 // nodes,
                                       CONFIG="configs/tiny/pretrain.yaml", LAUNCHER="deepspeed"))
        assert_completed(info)
        runs[nodes] = log_of(info)
    assert_spans_two_nodes(runs[2], 1)
    assert "--no_ssh --node_rank 1 --master_addr node1" in runs[2]
    assert_same_weights(latest_dir(tmp_path / "n1" / "checkpoints"), latest_dir(tmp_path / "n2" / "checkpoints"), 1e-6)


def test_dp_replicate_2_mp_2_on_two_nodes(slurm_2node, tiny_data, tiny_pretrained, tmp_path):
    """World 4 = 2 replicas x mp 2: each node holds one whole copy of the table (the all-to-all
    stays inside the node), replicas combine their row gradients across the nodes."""
    layout = ["dist.dp_replicate=2", "dist.mp=2", "logging.progress=false"]
    pre = slurm_2node.wait(submit(slurm_2node, tmp_path, [f"out_dir={tmp_path}/pre", "steps=3", "data.batch_size=4",
                                                          f"data.train={tiny_data}/pretrain", *layout],
                                  script="slurm/pretrain.sh", nodes=2, CONFIG="configs/tiny/pretrain.yaml"))
    assert_completed(pre)
    ft = slurm_2node.wait(submit(slurm_2node, tmp_path, [*finetune(tiny_data, tiny_pretrained, tmp_path / "ft", "steps=3",
                                                                   "data.batch_size=4"), *layout], nodes=2))
    assert_completed(ft)
    for info in (pre, ft):
        log = log_of(info)
        assert_spans_two_nodes(log, 2)
        assert "memory replicas bitwise identical: 2 copies of each of 2 shards" in log, log[-3000:]
    # Only replica 0 saves: one file per shard of the one table copy.
    assert len(list((latest_dir(tmp_path / "ft" / "checkpoints") / "memory").glob("*.safetensors"))) == 2


def test_preempted_two_node_job_requeues_and_ends_bitwise_equal(slurm_2node, two_node_finetune, tiny_data,
                                                                tiny_pretrained, tmp_path):
    out = tmp_path / "preempted"
    job = submit(slurm_2node, tmp_path, finetune(tiny_data, tiny_pretrained, out, f"steps={STEPS}", "checkpoint.every=0"),
                 nodes=2, ranks_per_node=1)
    wait_for_steps(out, 2)
    slurm_2node.run("scancel", "--signal=USR1", str(job))  # every process of the steps, on both nodes
    info = slurm_2node.wait(job)
    assert_completed(info)
    log = log_of(info)
    assert info["Restarts"] == "1" and "requeueing" in log and "(restart 1)" in log, log[-4000:]
    saved = int(re.search(r"preempted by signal 10: saved \S+ at step (\d+)", log).group(1))
    assert 2 <= saved < STEPS and f"at step {saved}" in log.split("(restart 1)")[1]
    assert metric_steps(out) == list(range(1, STEPS + 1))
    assert_same_weights(latest_dir(two_node_finetune / "checkpoints"), latest_dir(out / "checkpoints"), 0)


def rank_pids(cluster, node: str) -> list[int]:
    """The training ranks (not the launcher) running in `node`'s namespace."""
    ns = cluster.network.netns(node)
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
    ranks = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"launchers/train.py") for a in cmd) and b"torch.distributed.run" not in cmd:
            ranks.append(int(pid))
    return ranks


TIMEOUT_S = 20  # dist.timeout_s of the failure runs


def fail_node2(cluster, run: list[str], out: Path, tmp: Path, sig: signal.Signals) -> dict:
    """Start a long 2-node job, send node2's rank `sig` after step 3, and check that the job fails
    within dist.timeout_s plus a margin with no rank left on either node; -> the job record."""
    job = submit(cluster, tmp, [*run, "steps=100000"], nodes=2, ranks_per_node=1)
    wait_for_steps(out, 3)
    victims = rank_pids(cluster, "node2")
    assert len(victims) == 1
    hit_at = time.monotonic()
    os.kill(victims[0], sig)
    info = cluster.wait(job, timeout=TIMEOUT_S + 60)
    elapsed = time.monotonic() - hit_at
    assert info["JobState"] == "FAILED", log_of(info)[-3000:]
    assert elapsed < TIMEOUT_S + 30, f"the job took {elapsed:.0f}s to fail after node2's rank got {sig.name}"
    assert "launcher failed (exit 1): killing step" in log_of(info)
    assert rank_pids(cluster, "node1") == [] and rank_pids(cluster, "node2") == []
    return info


def test_killed_node_fails_the_job_everywhere_then_resubmit_resumes(slurm_2node, tiny_data, tiny_pretrained, tmp_path):
    """SIGKILL: the peers see closed connections at once."""
    out = tmp_path / "run"
    run = finetune(tiny_data, tiny_pretrained, out, "checkpoint.every=2", f"dist.timeout_s={TIMEOUT_S}")
    fail_node2(slurm_2node, run, out, tmp_path, signal.SIGKILL)
    saved = int((out / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert saved >= 2
    again = slurm_2node.wait(submit(slurm_2node, tmp_path, [*run, f"steps={saved + 2}"], nodes=2, ranks_per_node=1))
    assert_completed(again)
    assert f"at step {saved}" in log_of(again) and "resumed from" in log_of(again)
    assert metric_steps(out)[-2:] == [saved + 1, saved + 2]


def test_frozen_node_fails_the_job_everywhere_within_the_timeout(slurm_2node, tiny_data, tiny_pretrained, tmp_path):
    """SIGSTOP (a frozen node): its connections stay open, node1's rank times out after
    dist.timeout_s, and node1 kills the step on both nodes; without that the frozen rank would keep
    the job running until its time limit."""
    out = tmp_path / "run"
    fail_node2(slurm_2node, finetune(tiny_data, tiny_pretrained, out, f"dist.timeout_s={TIMEOUT_S}"), out, tmp_path,
               signal.SIGSTOP)


def test_every_global_step_is_one_fact_on_two_nodes(slurm_2node, tiny_data, tmp_path):
    """The tiny finetune set holds 8 facts x 64 paraphrases (column `group`), in fact order: on 2
    nodes x 2 ranks at batch 16 each global step must be exactly the next fact (with one canonical
    node per physical node it would hold half of fact s and half of fact s + 4)."""
    info = slurm_2node.wait(submit(slurm_2node, tmp_path, [f"out_dir={tmp_path}/out", f"data.train={tiny_data}/new_facts",
                                                           "data.batch_size=16", "data.one_group_per_batch=true", "steps=4"],
                                   nodes=2, ranks_per_node=2, ENTRY="tests/slurm/global_batches.py"))
    assert_completed(info)
    assert_spans_two_nodes(log_of(info), 2)
    assert json.loads((tmp_path / "out" / "global_batches.json").read_text()) == [[0], [1], [2], [3]]
