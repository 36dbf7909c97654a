"""Stop signals (checkpoint at a step boundary, exit 75, exact resume), named collective failures,
heartbeat suspects, rendezvous and placement — the launch-facing behaviour below the Slurm scripts."""

from __future__ import annotations

import datetime
import os
import signal
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from scaletrain.cli import main
from scaletrain.distributed.comm import CollectiveError, Comm
from scaletrain.distributed.env import DistEnv, RendezvousError, rendezvous
from scaletrain.distributed.heartbeat import Heartbeat
from scaletrain.distributed.placement import describe_placement
from scaletrain.trainer.stop import EXIT_REQUEUE, StopRequest

from conftest import TINY, read_metrics, tiny_overrides
from dist_harness import run_ranks

pytestmark = pytest.mark.e2e


def test_stop_request_flags_the_signal_and_restores_the_handler():
    before = signal.getsignal(signal.SIGUSR2)
    stop = StopRequest(("SIGUSR2",))
    try:
        assert not stop.agreed(Comm.single("world"), device=torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.received == "SIGUSR2"
        assert stop.agreed(Comm.single("world"), device=torch.device("cpu"))
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGUSR2) == before


def _signal_after(run_dir, steps: int) -> threading.Thread:
    """SIGUSR1 to this process once metrics.jsonl has `steps` lines (the handler runs in the main thread)."""
    def watch():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= steps:
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            time.sleep(0.01)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def test_usr1_checkpoints_exits_75_and_resumes_to_the_uninterrupted_losses(tmp_path, tokenizer_dir,
                                                                          dataset_prefix, monkeypatch, capsys):
    def train(run_dir, **extra):
        args = ["train", "--config", TINY]
        for item in tiny_overrides(run_dir, tokenizer_dir, dataset_prefix, **{"train.steps": 30, **extra}):
            args += ["--set", item]
        return main(args)

    assert train(tmp_path / "ref") == 0
    status = tmp_path / "exit-status"
    monkeypatch.setenv("SCALETRAIN_EXIT_STATUS_FILE", str(status))
    run = tmp_path / "run"
    watcher = _signal_after(run, 3)
    assert train(run) == EXIT_REQUEUE
    watcher.join()
    assert status.read_text().strip() == str(EXIT_REQUEUE)
    out = capsys.readouterr()
    assert "received SIGUSR1" in out.err and "exiting with code 75 for requeue" in out.out
    stopped = len(read_metrics(run))
    assert 3 <= stopped < 30 and (run / "checkpoints" / f"step_{stopped:07d}").is_dir()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # handler removed after the run

    assert train(run) == 0
    assert status.read_text().strip() == "0"
    assert [m["loss"] for m in read_metrics(run)] == [m["loss"] for m in read_metrics(tmp_path / "ref")]


def _timeout_names_the_operation(rank, world):
    import torch
    import torch.distributed as dist

    group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=1))
    comm = Comm(group, world, rank, "tp")
    if rank == 1:
        time.sleep(4)  # never joins the all-reduce in time
        return None
    try:
        comm.all_reduce(torch.ones(4))
    except CollectiveError as e:
        return str(e)
    return "no error"


def test_a_collective_timeout_names_rank_operation_and_group():
    msg = run_ranks(2, _timeout_names_the_operation, timeout=30)[0]
    assert msg.startswith("rank 0: all_reduce on the tp group (global ranks [0, 1]) failed:"), msg
    assert "parallel.timeout_s" in msg


def _suspects(rank, world):
    hb = Heartbeat(rank, world)
    hb.beat(1)
    if rank == 2:
        hb.beat(2)
        return None  # "hung": reached step 2, never reports the failure
    if rank == 1:
        time.sleep(1.5)
        return None  # never reaches step 2
    hb.beat(2)
    return hb.suspects(2, grace_s=1.0)


def test_heartbeats_name_ranks_that_are_behind_or_silent():
    msg = run_ranks(3, _suspects, timeout=30)[0]
    assert msg == ("ranks that have not reached step 2: rank 1 (last at step 1); "
                   "ranks at step 2 that reported no error within 1 s (hung or dead): [2]"), msg


class _Hung(Exception):
    pass


def _hang_in_stop_agreement(rank, world, args, port):
    """Run the CLI as under torchrun (its own process group, with parallel.timeout_s); rank 1 stops
    answering in the step-boundary stop agreement of step 2, after its update went through."""
    import torch.distributed as dist

    dist.destroy_process_group()  # the harness's group has the test's timeout; the CLI makes its own
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if rank == 1:
        import scaletrain.trainer.loop as loop

        calls = []
        agree = loop.agree

        def stuck(flags, world, device):
            calls.append(1)
            if len(calls) == 3:  # the agreements: before the first step, at step 1, at step 2
                time.sleep(8)  # past rank 0's timeout and grace: "alive but stuck"
                raise _Hung
            return agree(flags, world, device)
        loop.agree = stuck
    try:
        return main(args)
    except CollectiveError as e:
        return str(e)
    except _Hung:
        return "hung"


def test_a_rank_hung_outside_the_update_is_named(tmp_path, tokenizer_dir, dataset_prefix):
    """Any collective of a step can be the one left waiting (here the stop agreement, not train_step);
    the error still names the step and the silent rank."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["train", "--config", TINY]
    for item in tiny_overrides(tmp_path / "run", tokenizer_dir, dataset_prefix, **{
            "parallel.tp": 2, "train.steps": 6, "parallel.timeout_s": 3}):
        args += ["--set", item]
    msg, hung = run_ranks(2, _hang_in_stop_agreement, args, port, timeout=90)
    assert hung == "hung"
    assert msg.startswith("rank 0: all_reduce on the world group (global ranks [0, 1]) failed:"), msg
    assert msg.endswith("at step 2: ranks at step 2 that reported no error within 1 s (hung or dead): [1]"), msg


def test_rendezvous_sources():
    torchrun = DistEnv(0, 0, 2, "torchrun")
    assert rendezvous(torchrun, {"MASTER_ADDR": "h0", "MASTER_PORT": "1234"}) == ("h0", 1234)
    with pytest.raises(RendezvousError, match="MASTER_ADDR/MASTER_PORT are not set"):
        rendezvous(torchrun, {})
    slurm = DistEnv(0, 0, 2, "slurm")
    with pytest.raises(RendezvousError, match="SLURM_STEP_NODELIST"):
        rendezvous(slurm, {"SLURM_JOB_ID": "7"})


class _FakeComm:  # describe_placement only reads the size and member ranks of each axis
    def __init__(self, members):
        self.size, self._members = len(members), members

    def global_ranks(self):
        return self._members


def test_placement_reports_axes_and_warns_when_tp_crosses_nodes():
    def dims(tp_members, dp_members):
        comms = {"tp": _FakeComm(tp_members), "dp": _FakeComm(dp_members), "pp": _FakeComm([0]), "cp": _FakeComm([0])}
        return SimpleNamespace(comm=comms.__getitem__)

    hosts = ["n1", "n1", "n2", "n2"]
    line, warnings = describe_placement(dims([0, 1], [0, 2]), hosts)
    assert line == "placement: 2 node(s) × 2 rank(s), dp2 across 2 nodes, tp2 within a node" and not warnings
    line, warnings = describe_placement(dims([0, 2], [0, 1]), hosts)
    assert "tp2 across 2 nodes" in line and "spans 2 nodes" in warnings[0]
