"""Test-side adjustments of transformers models for exact float64 comparisons."""

from __future__ import annotations

import torch


def run_rotary_in_float64(hf_model, ours) -> None:
    """transformers computes RoPE angles in float32 even in a float64 model. Check its frequencies
    against ours at float32 precision, then run its rotary in float64 on our frequencies, so the
    rest of the architecture is compared exactly."""
    rot = hf_model.model.rotary_emb
    assert torch.allclose(rot.inv_freq.double(), ours.rope.inv_freq, rtol=1e-6, atol=0)
    rot.inv_freq = ours.rope.inv_freq.clone()

    def rotary(x, position_ids):
        freqs = position_ids[..., None].double() * rot.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * rot.attention_scaling).to(x.dtype), (emb.sin() * rot.attention_scaling).to(x.dtype)

    rot.forward = rotary
