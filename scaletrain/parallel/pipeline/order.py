"""The action list of each pipeline rank: which (direction, chunk, microbatch) it runs, in order.

Pure arithmetic that every rank can compute for every other rank: schedules.py executes it and
p2p_plan.py simulates all ranks' lists in lockstep to plan the traffic (so neither imports the other).
"""

from __future__ import annotations

FWD, BWD = 0, 1


def schedule_order(pp: int, vpp: int, rank: int, num_microbatches: int, forward_only: bool = False
                   ) -> list[tuple[int, int, int]]:
    """The action list of one rank: (FWD or BWD, chunk, microbatch)."""
    m = num_microbatches
    if vpp > 1 and m % pp:
        raise ValueError(f"interleaved 1F1B needs microbatches ({m}) to be a multiple of pp ({pp}); "
                         "change train.global_batch_size or train.micro_batch_size.")
    total = m * vpp

    def ident(k: int, backward: bool) -> tuple[int, int]:
        chunk = (k // pp) % vpp
        return (vpp - 1 - chunk if backward else chunk), (k // (pp * vpp)) * pp + k % pp

    if forward_only:
        return [(FWD, *ident(k, False)) for k in range(total)]
    warmup = min(pp - rank - 1, m) if vpp == 1 else min((pp - rank - 1) * 2 + (vpp - 1) * pp, total)
    order = [(FWD, *ident(k, False)) for k in range(warmup)]
    for i in range(total - warmup):
        order.append((FWD, *ident(warmup + i, False)))
        order.append((BWD, *ident(i, True)))
    order += [(BWD, *ident(k, True)) for k in range(total - warmup, total)]
    return order
