"""1F1B and interleaved 1F1B under the forward_step/loss_fn contract (DESIGN rule 5).

Each rank executes a fixed list of actions F(chunk, microbatch) / B(chunk, microbatch):

  1F1B (vpp = 1): pp − rank − 1 warm-up forwards, then one forward + one backward alternating,
    then the remaining backwards. Stage 0 never holds more than pp microbatches' activations.
  interleaved (vpp > 1, Megatron's order): virtual microbatch k runs chunk (k // pp) % vpp on
    microbatch (k // (pp·vpp))·pp + k % pp; warm-up (pp − rank − 1)·2 + (vpp − 1)·pp forwards.
    Needs microbatches % pp == 0.

Point-to-point traffic moves contiguous tensors whose shapes are agreed up front (from each
microbatch's shape and the model width), in batches planned so that NCCL cannot deadlock on them
(p2p_plan.py: sends and receives of one round posted together, in the same order at both ends of a
pair). Batches are asynchronous: a rank waits on one only when an action needs the data it
receives, and on the rest at the end of the step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from scaletrain.distributed.dims import ParallelDims
from scaletrain.distributed.p2p import P2POp, P2PWork
from scaletrain.parallel.pipeline.order import BWD, FWD, schedule_order
from scaletrain.parallel.pipeline.p2p_plan import Message, rank_rounds
from scaletrain.parallel.pipeline.split import StageChunk
from scaletrain.parallel.schedules import ForwardStep
from scaletrain.profile.phases import phase


def forward_backward_pipelining(forward_step: ForwardStep, microbatches: Sequence[dict[str, torch.Tensor]],
                                chunks: list[StageChunk], dims: ParallelDims, *, normaliser: float,
                                forward_only: bool = False, stats: dict | None = None
                                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run one step's microbatches through this rank's chunks; grads accumulate in `.grad`.

    Returns the normalised loss summed over the microbatches this rank finished, and the objective's
    summed metrics (both non-zero on the last pipeline rank only; the caller reduces them over pp). `stats`, if given, receives the
    seconds spent waiting for receives ('wait_s') and the peak number of microbatches in flight.
    """
    pp, vpp, r = dims.pp, dims.vpp, dims.pp_rank
    comm = dims.comm("pp")
    device = next(chunks[0].module.parameters()).device
    # Messages travel in the compute dtype: bf16 under autocast even where the weights are fp32
    # (precision.params = 'fp32'), the weights' dtype otherwise (bf16 weights, float32, float64).
    dtype = next(chunks[0].module.parameters()).dtype
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    # Per microbatch: they may differ in rows (the rollout sampler drops finished rows) or width.
    shapes = [chunks[0].activation_shape(mb["tokens"], dims.tp) for mb in microbatches]
    inputs: dict[tuple[int, int], torch.Tensor | None] = {}
    outputs: dict[tuple[int, int], torch.Tensor] = {}
    rounds = rank_rounds(pp, vpp, r, len(microbatches), forward_only)
    outbox: dict[Message, torch.Tensor] = {}  # computed, waiting for their round's batch
    inbox: dict[Message, tuple[P2PWork, torch.Tensor]] = {}  # posted receives: batch, buffer
    posted: list[P2PWork] = []
    next_round = actions_run = 0
    total = torch.zeros((), dtype=torch.float64)
    summed: dict[str, torch.Tensor] = {}  # the objective's metric sums (last pipeline rank)
    wait_s, in_flight, peak = 0.0, 0, 0

    def stage_of(chunk: int) -> int:
        return chunk * pp + r

    def tag(m: Message) -> int:
        return (m.mb * pp * vpp + m.stage) * 2 + m.direction

    def what(m: Message) -> str:
        return f"{'activations' if m.direction == FWD else 'gradients'} (tag {tag(m)})"

    def failed(what: str, peer: int, err: Exception) -> RuntimeError:
        return RuntimeError(f"pipeline rank {r} (global rank {dims.rank}): {what} pipeline rank {peer} failed: "
                            f"{err}. The peer process has most likely died or hung; its own log says why.")

    def post_ready() -> None:
        """Post, in order, every round due after the actions run so far (p2p_plan.Round.after)."""
        nonlocal next_round
        while next_round < len(rounds) and rounds[next_round].after <= actions_run:
            rnd = rounds[next_round]
            ops = [P2POp("send", outbox.pop(m), dst, tag(m)) for m, dst in rnd.sends]
            ops += [P2POp("recv", torch.empty(shapes[m.mb], dtype=dtype, device=device), src, tag(m))
                    for m, src in rnd.recvs]
            try:
                work = comm.batch_p2p(ops)
            except RuntimeError as e:
                peer = (rnd.sends or rnd.recvs)[0][1]
                raise failed(f"sending {what((rnd.sends or rnd.recvs)[0][0])} to", peer, e) from e
            posted.append(work)
            for (m, _src), op in zip(rnd.recvs, ops[len(rnd.sends):]):
                inbox[m] = (work, op.tensor)
            next_round += 1

    def recv(m: Message, src_rank: int) -> torch.Tensor:
        nonlocal wait_s
        work, buf = inbox.pop(m)  # posted: its round came before this action's
        t0 = time.perf_counter()
        try:
            with phase("pipeline_wait"):
                work.wait()
        except RuntimeError as e:  # gloo/nccl: peer closed the connection, or the collective timed out
            raise failed(f"receiving {what(m)} from", src_rank, e) from e
        wait_s += time.perf_counter() - t0
        return buf

    def send(t: torch.Tensor, m: Message) -> None:
        outbox[m] = t  # posted with its round, right after this action

    def forward(chunk_id: int, mb: int) -> None:
        nonlocal total, in_flight, peak
        chunk, j = chunks[chunk_id], stage_of(chunk_id)
        inp = None
        if not chunk.is_first:
            inp = recv(Message(FWD, j, mb), (r - 1) % pp).requires_grad_(not forward_only)
        chunk.input_tensor = inp
        with torch.set_grad_enabled(not forward_only), phase("forward"):
            output, loss_fn = forward_step(microbatches[mb], chunk)  # type: ignore[arg-type]
            if chunk.is_last:
                loss_sum, metrics = loss_fn(output)
                output = loss_sum / normaliser
                total = total + output.detach().to(torch.float64).cpu()
                for k, v in metrics.items():
                    summed[k] = summed.get(k, 0) + v.detach()
        chunk.input_tensor = None
        if not chunk.is_last:
            send(output.detach().to(dtype).contiguous(), Message(FWD, j + 1, mb))
        if not forward_only:
            inputs[(chunk_id, mb)], outputs[(chunk_id, mb)] = inp, output
            in_flight += 1
            peak = max(peak, in_flight)

    def backward(chunk_id: int, mb: int) -> None:
        nonlocal in_flight
        chunk, j = chunks[chunk_id], stage_of(chunk_id)
        inp, out = inputs.pop((chunk_id, mb)), outputs.pop((chunk_id, mb))
        if chunk.is_last:
            with phase("backward"):
                out.backward()
        else:
            grad = recv(Message(BWD, j, mb), (r + 1) % pp)
            with phase("backward"):
                torch.autograd.backward(out, grad)
        del out  # this microbatch's activations are freed here
        in_flight -= 1
        if inp is not None:
            send(inp.grad.contiguous(), Message(BWD, j - 1, mb))  # type: ignore[union-attr]

    try:
        comm.warm_up_p2p(device)
    except RuntimeError as e:
        raise failed("starting point-to-point traffic with", (r + 1) % pp, e) from e
    post_ready()  # receives due before this rank's first action
    for direction, chunk_id, mb in schedule_order(pp, vpp, r, len(microbatches), forward_only):
        (forward if direction == FWD else backward)(chunk_id, mb)
        actions_run += 1
        post_ready()
    assert next_round == len(rounds) and not outbox and not inbox, "pipeline p2p plan and actions disagree"
    for work in posted:
        try:
            work.wait()
        except RuntimeError as e:
            raise failed("completing a send to", work.ops[0].peer, e) from e
    if stats is not None:
        stats.update(wait_s=wait_s, peak_in_flight=peak)
    return total, summed
