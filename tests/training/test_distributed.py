"""torch.distributed helpers: a single-process context without torchrun's environment; a real
2-process gloo group (two child processes running this file) where `all_reduce_mean` averages, `barrier` waits for the
slower rank, and `evaluate(reduce_across_ranks=True)` sums the ranks' confusion matrices."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from fcnseg.evaluation import evaluate
from fcnseg.training.distributed import (
    DistributedContext,
    all_reduce_mean,
    barrier,
    cleanup_distributed,
    setup_distributed,
)


def test_without_torchrun_the_context_is_one_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    ctx = setup_distributed("cpu")
    assert ctx == DistributedContext(rank=0, world_size=1, local_rank=0)
    assert not ctx.enabled and ctx.is_main
    assert not torch.distributed.is_initialized()
    assert all_reduce_mean(2.5, ctx, torch.device("cpu")) == 2.5
    barrier(ctx)  # no group: returns at once
    cleanup_distributed()  # nothing to clean up, no error

    monkeypatch.setenv("WORLD_SIZE", "1")
    assert setup_distributed("cpu") == DistributedContext()


def test_context_properties():
    assert DistributedContext(rank=1, world_size=2).enabled
    assert not DistributedContext(rank=1, world_size=2).is_main
    assert DistributedContext(rank=0, world_size=4, local_rank=0).is_main


def _worker(rank: int, port: int, out: str) -> None:
    """One rank of the job, in a child process (`python this_file.py RANK PORT OUT`: not a fork of the
    test process, which may hold threads of other libraries, JAX's among them, that a fork would copy
    half-locked)."""
    try:
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE="2")
        ctx = setup_distributed("cpu")
        mean = all_reduce_mean(10.0 * (rank + 1), ctx, torch.device("cpu"))  # 10 and 20 -> 15

        if rank == 1:
            time.sleep(0.5)  # the slower rank: rank 0 must wait for it at the barrier
        reached = time.time()
        barrier(ctx)
        passed = time.time()

        # each rank evaluates its own images; the reduced matrix must count both ranks' pixels
        image, target = _rank_batch(rank)
        _, matrix, loss = evaluate(torch.nn.Identity(), [(image, target)], 3, device=torch.device("cpu"),
                                   reduce_across_ranks=True)
        cleanup_distributed()
        result = {"rank": ctx.rank, "world_size": ctx.world_size, "local_rank": ctx.local_rank,
                  "enabled": ctx.enabled, "is_main": ctx.is_main, "mean": mean, "reached": reached,
                  "passed": passed, "matrix": matrix.matrix.tolist(), "loss": loss,
                  "initialized_after_cleanup": torch.distributed.is_initialized()}
    except BaseException as err:  # reported to the test, which fails with it
        result = {"error": traceback.format_exc() or repr(err)}
    with open(out, "w") as f:
        json.dump(result, f)


def _rank_batch(rank: int):
    gen = torch.Generator().manual_seed(rank)
    image = torch.randn(2, 3, 4, 5, generator=gen)
    target = torch.randint(0, 3, (2, 4, 5), generator=gen)
    target[0, 0] = 255
    return image, target


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_evaluation(rank: int):
    image, target = _rank_batch(rank)
    keep = target != 255
    matrix = torch.zeros(3, 3, dtype=torch.int64)
    for t, p in zip(target[keep].tolist(), image.argmax(1)[keep].tolist()):
        matrix[t, p] += 1
    loss_sum = torch.nn.functional.cross_entropy(image.double(), target, ignore_index=255, reduction="sum")
    return matrix, float(loss_sum), int(keep.sum())


def test_two_gloo_processes_average_wait_and_reduce(tmp_path):
    port = _free_port()
    outs = [tmp_path / f"rank{rank}.json" for rank in range(2)]
    procs = [subprocess.Popen([sys.executable, str(Path(__file__)), str(rank), str(port), str(out)])
             for rank, out in enumerate(outs)]
    try:
        for proc in procs:
            proc.wait(timeout=120)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [proc.returncode for proc in procs] == [0, 0]
    results = [json.loads(out.read_text()) for out in outs]
    for result in results:
        assert "error" not in result, result["error"]
    results.sort(key=lambda r: r["rank"])

    assert [r["rank"] for r in results] == [0, 1] and [r["local_rank"] for r in results] == [0, 1]
    assert all(r["world_size"] == 2 and r["enabled"] for r in results)
    assert [r["is_main"] for r in results] == [True, False]
    assert [r["mean"] for r in results] == [15.0, 15.0]
    # rank 0 reached the barrier first but left it only after the slower rank had reached it
    assert results[0]["reached"] < results[1]["reached"]
    assert results[0]["passed"] >= results[1]["reached"] - 0.05
    assert not any(r["initialized_after_cleanup"] for r in results)

    (m0, l0, c0), (m1, l1, c1) = _local_evaluation(0), _local_evaluation(1)
    for r in results:
        assert r["matrix"] == (m0 + m1).tolist()
        assert r["loss"] == pytest.approx((l0 + l1) / (c0 + c1), rel=1e-6)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
