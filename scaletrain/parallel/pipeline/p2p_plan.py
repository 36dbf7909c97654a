"""When each pipeline message travels: batches of sends and receives that cannot deadlock under NCCL.

Under NCCL a pair of ranks matches messages by their order (tags are ignored), and a large send
completes only once the peer has posted the matching receive. Posting each send and each receive on
its own, in compute order, hangs: in 1F1B's steady state stage 0 posts [send a(i+1), recv g(i)]
while stage 1 posts [send g(i), recv a(i+1)] — each send waits for a receive queued behind the
other's send. Megatron pairs them by hand (send_forward_recv_backward, …, one batch_isend_irecv each).

Here the pairing is derived from the schedule tables of every rank (order.schedule_order), which
every rank can compute: a lockstep simulation runs each rank's action list one action per tick, an
action running once its input arrived in an earlier tick, and every message produced in tick t
travels in *round* t. A rank posts one batch per round it takes part in, in round order, with that
round's sends and receives sorted by message, so both ends of a pair list the pair's messages in the
same order. No deadlock follows by induction over rounds: the sends of round t depend only on data of
rounds < t, so once those completed every rank can post round t, and round t's batches match.

A rank posts round t as soon as it has run its actions of ticks ≤ t — the one that computed the
round's sends, if any, is the last of them — so receives are posted ahead of need by the lockstep's
margin only (the receive buffers alive at once stay those of a lockstep run, also where a rank only
receives, as the last stage does in forward-only passes), and their data arrives while this rank
computes (the overlap the tag-matched isend/irecv had). A rank waits on a batch only when an action
needs the data it receives.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from functools import lru_cache

from scaletrain.parallel.pipeline.order import BWD, FWD, schedule_order


@dataclass(frozen=True, order=True)
class Message:
    """An activation (FWD) sent to virtual stage `stage`, or a gradient (BWD) sent back to it, of
    microbatch `mb`. Ordered by (direction, stage, mb): the order both ends post it within a round."""

    direction: int
    stage: int
    mb: int


@dataclass(frozen=True)
class Round:
    """This rank's part of one round: messages sent (with the receiving pipeline rank) and received
    (with the sending one), each in message order, and when to post it."""

    sends: tuple[tuple[Message, int], ...]
    recvs: tuple[tuple[Message, int], ...]
    after: int  # post once this many of the rank's actions ran (those of ticks ≤ the round's)


def input_message(direction: int, stage: int, mb: int, num_stages: int) -> Message | None:
    """What an action at virtual stage `stage` receives before it runs (None: nothing)."""
    if direction == FWD:
        return Message(FWD, stage, mb) if stage > 0 else None
    return Message(BWD, stage, mb) if stage < num_stages - 1 else None


def output_message(direction: int, stage: int, mb: int, num_stages: int) -> Message | None:
    """What an action at virtual stage `stage` sends once it ran (None: nothing)."""
    if direction == FWD:
        return Message(FWD, stage + 1, mb) if stage < num_stages - 1 else None
    return Message(BWD, stage - 1, mb) if stage > 0 else None


@lru_cache(maxsize=64)
def _simulate(pp: int, vpp: int, num_microbatches: int, forward_only: bool
              ) -> tuple[tuple[tuple[Message, ...], ...], tuple[tuple[int, ...], ...]]:
    """The lockstep simulation: every message of one step by round (each round sorted), and the tick
    each rank's actions run at."""
    num_stages = pp * vpp
    orders = [schedule_order(pp, vpp, q, num_microbatches, forward_only) for q in range(pp)]
    ticks: list[list[int]] = [[] for _ in range(pp)]
    arrived: dict[Message, int] = {}
    rounds: list[tuple[Message, ...]] = []
    while any(len(ticks[q]) < len(orders[q]) for q in range(pp)):
        tick, produced, ran = len(rounds), [], False
        for q in range(pp):
            if len(ticks[q]) == len(orders[q]):
                continue
            direction, chunk, mb = orders[q][len(ticks[q])]
            stage = chunk * pp + q
            need = input_message(direction, stage, mb, num_stages)
            if need is not None and arrived.get(need, tick) >= tick:
                continue  # its input has not arrived yet
            ticks[q].append(tick)
            ran = True
            out = output_message(direction, stage, mb, num_stages)
            if out is not None:
                produced.append(out)
        if not ran:
            raise RuntimeError(f"pipeline schedule pp={pp} vpp={vpp} m={num_microbatches} cannot make progress")
        for msg in produced:
            arrived[msg] = tick
        rounds.append(tuple(sorted(produced)))
    return tuple(rounds), tuple(tuple(t) for t in ticks)


def plan_rounds(pp: int, vpp: int, num_microbatches: int, forward_only: bool) -> tuple[tuple[Message, ...], ...]:
    """Every message of one step, by round (the lockstep simulation above); each round sorted."""
    return _simulate(pp, vpp, num_microbatches, forward_only)[0]


def sender(m: Message) -> int:
    """The virtual stage that sends `m`: the one before it (activations) or after it (gradients)."""
    return m.stage - 1 if m.direction == FWD else m.stage + 1


def rank_rounds(pp: int, vpp: int, rank: int, num_microbatches: int, forward_only: bool) -> list[Round]:
    """The batches pipeline rank `rank` posts, in order (rounds it takes no part in left out)."""
    rounds, ticks = _simulate(pp, vpp, num_microbatches, forward_only)
    out = []
    for t, messages in enumerate(rounds):
        sends = tuple((m, m.stage % pp) for m in messages if sender(m) % pp == rank)
        recvs = tuple((m, sender(m) % pp) for m in messages if m.stage % pp == rank)
        if sends or recvs:
            out.append(Round(sends, recvs, bisect_right(ticks[rank], t)))
    return out
