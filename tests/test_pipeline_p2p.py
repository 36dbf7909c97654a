"""Pipeline traffic that cannot deadlock under NCCL, checked under the harness's NCCL-like rendezvous
transport (rendezvous_p2p.py: a send completes only once its receive is posted; per-peer order,
tags ignored). The model parity suites (test_pipeline_parallel, test_pp_train, …) run under the same
transport by default; here: the transport itself, the planned batches on many layouts, and the
ordering the schedules used before (each isend / blocking irecv on its own), which deadlocks."""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from scaletrain.distributed.comm import Comm
from scaletrain.distributed.p2p import P2POp
from scaletrain.parallel.pipeline.p2p_plan import BWD, FWD, Message, plan_rounds, rank_rounds
from scaletrain.parallel.pipeline.schedules import forward_backward_pipelining, schedule_order

from dist_harness import RankFailure, run_ranks

pytestmark = pytest.mark.parity


def _world(rank: int, world: int) -> Comm:
    return Comm(None, world, rank, "pp")


# --- the transport ---------------------------------------------------------------------------------

def _late_receiver(rank: int, world: int, delay: float) -> float:
    comm = _world(rank, world)
    if rank == 0:
        t0 = time.perf_counter()
        comm.batch_p2p([P2POp("send", torch.arange(4.0), 1, tag=7)]).wait()
        return time.perf_counter() - t0
    time.sleep(delay)
    buf = torch.zeros(4)
    comm.batch_p2p([P2POp("recv", buf, 0, tag=7)]).wait()
    assert torch.equal(buf, torch.arange(4.0))
    return 0.0


def test_a_send_completes_only_once_its_receive_is_posted():
    waited, _ = run_ranks(2, _late_receiver, 1.0, timeout=30)
    assert waited >= 0.9


def _two_sends(rank: int, world: int, recv_tags: tuple[int, int], recv_sizes: tuple[int, int]) -> list:
    comm = _world(rank, world)
    if rank == 0:
        comm.batch_p2p([P2POp("send", torch.full((2,), 1.0), 1, tag=1),
                        P2POp("send", torch.full((2,), 2.0), 1, tag=2)]).wait()
        return []
    bufs = [torch.zeros(n) for n in recv_sizes]
    comm.batch_p2p([P2POp("recv", b, 0, tag=t) for b, t in zip(bufs, recv_tags)]).wait()
    return [b.tolist() for b in bufs]


def test_messages_match_by_per_peer_order_not_by_tag():
    assert run_ranks(2, _two_sends, (1, 2), (2, 2), timeout=30)[1] == [[1.0, 1.0], [2.0, 2.0]]
    # gloo matches by tag, so a receiver listing the tags the other way round gets them swapped back;
    # NCCL would deliver by order: the harness refuses the mismatch instead of hiding it.
    assert run_ranks(2, _two_sends, (2, 1), (2, 2), timeout=30, p2p="gloo")[1] == [[2.0, 2.0], [1.0, 1.0]]
    with pytest.raises(RankFailure, match="tag 1 sent where tag 2 is expected"):
        run_ranks(2, _two_sends, (2, 1), (2, 2), timeout=30)
    with pytest.raises(RankFailure, match="8 bytes sent, 12 bytes expected"):
        run_ranks(2, _two_sends, (1, 2), (3, 2), timeout=30)


# --- the ordering before: each isend and blocking irecv posted on its own ----------------------------

def _old_ordering(rank: int, world: int, pp: int, m: int) -> str:
    """The traffic of the schedules before batching, without a model: per action, a blocking receive
    of its input, then an asynchronous send of its output, tagged by (direction, stage, microbatch)."""
    comm, pending = _world(rank, world), []
    for direction, _chunk, mb in schedule_order(pp, 1, rank, m):
        if direction == FWD and rank > 0:
            comm.batch_p2p([P2POp("recv", torch.empty(64), rank - 1, tag=(mb * pp + rank) * 2 + FWD)]).wait()
        if direction == BWD and rank < pp - 1:
            comm.batch_p2p([P2POp("recv", torch.empty(64), rank + 1, tag=(mb * pp + rank) * 2 + BWD)]).wait()
        if direction == FWD and rank < pp - 1:
            pending.append(comm.batch_p2p([P2POp("send", torch.ones(64), rank + 1, tag=(mb * pp + rank + 1) * 2)]))
        if direction == BWD and rank > 0:
            pending.append(comm.batch_p2p([P2POp("send", torch.ones(64), rank - 1, tag=(mb * pp + rank - 1) * 2 + 1)]))
    for work in pending:
        work.wait()
    return "done"


def test_the_old_ordering_deadlocks_under_rendezvous_and_gloo_hides_it():
    assert run_ranks(2, _old_ordering, 2, 4, timeout=30, p2p="gloo") == ["done", "done"]
    t0 = time.monotonic()
    with pytest.raises(RankFailure, match="deadlock") as e:
        run_ranks(2, _old_ordering, 2, 4, timeout=30, p2p_timeout=3)
    assert time.monotonic() - t0 < 10
    # 1F1B's steady state: stage 0 sends a(1) before receiving g(0), stage 1 sends g(0) before receiving a(1)
    # (whichever rank times out first reports it; the other may see it die first).
    msg = str(e.value)
    assert "rank 0 waits to send message 1 (tag 6)" in msg or "rank 1 waits to send message 0 (tag 1)" in msg


# --- the planned batches, through the real schedule, on many layouts ---------------------------------

@dataclass
class _Chunk:
    """A virtual stage of a toy pipeline: x ↦ tanh(w·x + stage) elementwise (first stage: x = tokens)."""

    module: torch.nn.Module
    stage: int
    is_first: bool
    is_last: bool
    input_tensor: torch.Tensor | None = None

    def activation_shape(self, tokens: torch.Tensor, tp: int) -> tuple[int, ...]:
        return (*tokens.shape, 3)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens[..., None].double().expand(*tokens.shape, 3) if self.input_tensor is None else self.input_tensor
        return torch.tanh(self.module.weight.view(-1) * x + self.stage)


def _toy_weights(stages: int) -> list[torch.nn.Module]:
    return [torch.nn.Linear(1, 3, dtype=torch.float64) for _ in range(stages)]


def _toy_microbatches(m: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"tokens": torch.rand(1 + i % 3, 2, generator=g)} for i in range(m)]  # rows differ per microbatch


def _forward_step(batch, chunk):
    out = chunk(batch["tokens"])
    return out, lambda y: ((y * y).sum(), {})


def _toy_pipeline(rank: int, world: int, vpp: int, m: int, forward_only: bool) -> dict:
    torch.manual_seed(0)
    weights = _toy_weights(world * vpp)
    stages = [v * world + rank for v in range(vpp)]
    chunks = [_Chunk(weights[j], j, j == 0, j == world * vpp - 1) for j in stages]
    dims = SimpleNamespace(pp=world, vpp=vpp, pp_rank=rank, rank=rank, tp=1, comm=lambda axis: _world(rank, world))
    loss, _ = forward_backward_pipelining(_forward_step, _toy_microbatches(m), chunks, dims,  # type: ignore[arg-type]
                                          normaliser=1.0, forward_only=forward_only)
    return {"loss": loss, "grads": {j: weights[j].weight.grad for j in stages}}


def _toy_reference(stages: int, m: int) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    torch.manual_seed(0)
    weights = _toy_weights(stages)
    total = torch.zeros((), dtype=torch.float64)
    for batch in _toy_microbatches(m):
        x = None
        for j in range(stages):
            chunk = _Chunk(weights[j], j, j == 0, j == stages - 1, x)
            x = chunk(batch["tokens"])
        loss = (x * x).sum()
        loss.backward()
        total += loss.detach()
    return total, {j: w.weight.grad for j, w in enumerate(weights)}


LAYOUTS = [  # (pp, vpp, microbatches)
    (2, 1, 1), (2, 1, 5), (3, 1, 2), (3, 1, 7), (4, 1, 6), (2, 2, 2), (2, 2, 6), (2, 3, 4), (3, 2, 6), (4, 2, 8),
]


@pytest.mark.parametrize("pp,vpp,m,forward_only", [(*layout, False) for layout in LAYOUTS]
                         + [(2, 1, 5, True), (3, 1, 2, True), (2, 2, 6, True), (4, 2, 8, True)])
def test_planned_batches_run_every_schedule_to_completion_under_rendezvous(pp, vpp, m, forward_only):
    ref_loss, ref_grads = _toy_reference(pp * vpp, m)
    ranks = run_ranks(pp, _toy_pipeline, vpp, m, forward_only, timeout=60, p2p_timeout=10)
    assert torch.allclose(ranks[-1]["loss"], ref_loss, rtol=1e-12)
    for r in ranks:
        for j, g in r["grads"].items():
            assert (g is None) if forward_only else torch.allclose(g, ref_grads[j], rtol=1e-12), (j, g)


@pytest.mark.parametrize("pp,vpp,m", LAYOUTS)
def test_plan_properties(pp, vpp, m):
    """Each message travels once, in a round after the action that produced it ran and before the one
    that needs it; a rank's sends come in its program order (so batches are posted in round order)."""
    for forward_only in (False, True):
        rounds = plan_rounds(pp, vpp, m, forward_only)
        messages = [msg for rnd in rounds for msg in rnd]
        assert len(messages) == len(set(messages))
        expected = (pp * vpp - 1) * m * (1 if forward_only else 2)
        assert len(messages) == expected
        for rank in range(pp):
            mine = rank_rounds(pp, vpp, rank, m, forward_only)
            sent = [msg for rnd in mine for msg, _dst in rnd.sends]
            produced = []
            for direction, chunk, mb in schedule_order(pp, vpp, rank, m, forward_only):
                stage = chunk * pp + rank
                if direction == FWD and stage < pp * vpp - 1:
                    produced.append(Message(FWD, stage + 1, mb))
                if direction == BWD and stage > 0:
                    produced.append(Message(BWD, stage - 1, mb))
            assert sent == produced
            # Receives are posted ahead of need by the lockstep's margin only: the receive buffers alive
            # at once stay few, also on a rank that only receives (the last stage, forward-only).
            posted = live = peak = 0
            actions = schedule_order(pp, vpp, rank, m, forward_only)
            for i in range(len(actions) + 1):
                while posted < len(mine) and mine[posted].after <= i:
                    live += len(mine[posted].recvs)
                    posted += 1
                peak = max(peak, live)
                if i < len(actions):
                    direction, chunk, _mb = actions[i]
                    stage = chunk * pp + rank
                    live -= (direction == FWD and stage > 0) or (direction == BWD and stage < pp * vpp - 1)
            assert posted == len(mine) and live == 0
            assert peak <= 2 * vpp, (rank, forward_only, peak)


def _train_pp(rank, world, *args):
    from layout_models import pipeline_train

    return pipeline_train(rank, world, *args)


@pytest.mark.parametrize("tp,pp,vpp,sp,n_micro,tied", [(1, 4, 1, False, 5, True), (1, 2, 2, False, 4, True)])
def test_torch_transport_keeps_parity(tp, pp, vpp, sp, n_micro, tied):
    """The same schedules through torch.distributed's batch_isend_irecv (gloo), as CPU runs use."""
    from layout_models import pipeline_config, pipeline_train
    from parity import assert_matches

    cfg = pipeline_config(tied)
    ref = pipeline_train(0, 1, cfg, 1, 1, 1, False, n_micro)
    ranks = run_ranks(tp * pp, _train_pp, cfg, tp, pp, vpp, sp, n_micro, timeout=120, p2p="gloo")
    assert_matches(ranks, ref, tp, 1e-10)


def _dies_after_two_forwards(rank: int, world: int) -> None:
    import os

    calls = []

    def step(batch, chunk):
        calls.append(1)
        if chunk.stage == 1 and len(calls) == 2:
            os._exit(9)  # the last stage dies mid-schedule, having answered microbatch 0
        return _forward_step(batch, chunk)

    weights = _toy_weights(2)
    dims = SimpleNamespace(pp=2, vpp=1, pp_rank=rank, rank=rank, tp=1, comm=lambda axis: _world(rank, world))
    forward_backward_pipelining(step, _toy_microbatches(4), [_Chunk(weights[rank], rank, rank == 0, rank == 1)],
                                dims, normaliser=1.0)  # type: ignore[arg-type]


def test_a_stage_dying_mid_schedule_fails_its_peer_under_rendezvous():
    with pytest.raises(RankFailure) as e:
        run_ranks(2, _dies_after_two_forwards, timeout=60)
    msg = str(e.value)
    assert "rank 1 died with exit code 9" in msg
    assert "pipeline rank 0 (global rank 0): receiving gradients" in msg and "rank 1 died" in msg
    assert "did not finish" not in msg
