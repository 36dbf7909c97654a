"""Per-token values of finished rows on the training layout (a frozen reference's log-probs, the sampling
policy's, a critic's values): a forward-only pass through the layout's schedule, recorded on the last
pipeline stage, split over cp and gathered back to whole rows; and a response's sequence log-probability
from its per-token losses (DPO, preference evaluation)."""

from __future__ import annotations

import torch

from scaletrain.data.packing import model_inputs
from scaletrain.distributed.comm import Comm
from scaletrain.distributed.dims import ParallelDims
from scaletrain.nn import cross_entropy_per_token
from scaletrain.parallel.context_parallel import gather_sequence, shard_microbatch, sum_over_cp
from scaletrain.trainer.step import forward_pass


@torch.no_grad()
def token_logprobs(model: torch.nn.Module, dims: ParallelDims, microbatches: list[dict], *, temperature: float, precision,
                   fused_cross_entropy: bool = False) -> list[torch.Tensor]:
    """Per-token log-probs of each microbatch's labels, [M, s] each (fp32 or wider), under `model` (a frozen
    reference) at sampling temperature. Exact on the last pipeline stage (where the loss needs
    them); zeros elsewhere. Collective over tp and pp."""
    tp = dims.tp_comm
    out: dict[int, torch.Tensor] = {}

    def forward_step(batch: dict[str, torch.Tensor], module: torch.nn.Module):
        logits = module(batch["tokens"], **model_inputs(batch))

        def record(output: torch.Tensor):
            scaled = output if temperature == 1.0 else output / temperature
            out[int(batch["mb"])] = -cross_entropy_per_token(scaled, batch["labels"], tp, fused=fused_cross_entropy)
            return output.new_zeros(()), {}

        return logits, record

    return per_token_pass(model, dims, microbatches, forward_step, out, precision=precision)


def per_token_pass(model: torch.nn.Module, dims: ParallelDims, microbatches: list[dict], forward_step, out: dict[int, torch.Tensor],
                   *, precision) -> list[torch.Tensor]:
    """A forward-only pass whose `forward_step` records per-token values [M, s(/cp)] of microbatch i in
    out[i] on the last pipeline stage: run in eval mode, under cp on each rank's share of the rows
    (the microbatches, replicated over cp, are split here) and gathered back to whole rows [M, s] on
    every cp rank. Zeros on the other stages. Collective over tp, cp and pp."""
    cp = dims.comm("cp") if dims.cp > 1 else None
    tagged = [{**mb, "mb": torch.tensor(i)} for i, mb in enumerate(microbatches)]
    if cp is not None:
        tagged = [shard_microbatch(mb, cp) for mb in tagged]
    was_training = model.training
    model.eval()
    try:
        with precision.autocast():
            forward_pass(forward_step, tagged, model, dims)
    finally:
        model.train(was_training)
    result = []
    for i, mb in enumerate(microbatches):
        if i in out:
            result.append(gather_sequence(out[i], cp))
        else:  # not the last stage: nothing computed (its ranks never read these)
            result.append(torch.zeros(mb["tokens"].shape, dtype=torch.float64, device=mb["tokens"].device))
    return result


def sequence_logprobs(per_token_loss: torch.Tensor, response_mask: torch.Tensor, length_normalised: bool,
                      cp: Comm | None = None) -> torch.Tensor:
    """Sequence log-probability [b] from per-token cross-entropy [b, s] (= −log p of each label, as the
    vocab-parallel loss computes it without gathering the vocabulary) over the response tokens.

    cp: under context parallelism the tokens are this rank's share of each row; the sums (and the
    token counts of the length-normalised form) are summed over cp, so every cp rank returns the
    whole sequence's value (differentiably)."""
    mask = response_mask.to(per_token_loss.dtype)
    total = sum_over_cp(-(per_token_loss * mask).sum(-1), cp)
    if not length_normalised:
        return total
    count = mask.sum(-1)
    if cp is not None and cp.size > 1:
        count = cp.all_reduce(count.detach().clone())
    return total / count.clamp(min=1)
