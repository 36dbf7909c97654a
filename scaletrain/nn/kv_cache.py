"""Keys and values of the tokens decoded so far, per layer, for incremental decoding (rollouts).

Placement: each tensor is [b, s, kv_heads/tp, d], local to its tp rank (a rank caches the heads it
computes). Only the model's forward writes to it; a cache serves one batch of rows from its first
(prompt) call to its last token, and is dropped with it.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self) -> None:
        self._kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def layer(self, key: str) -> LayerCache:
        return LayerCache(self, key)

    @property
    def length(self) -> int:
        """Positions cached so far (0 before the first call)."""
        return next(iter(self._kv.values()))[0].shape[1] if self._kv else 0


class LayerCache:
    """One layer's view of a KVCache: `extend` appends this call's keys/values, returns all of them."""

    def __init__(self, cache: KVCache, key: str) -> None:
        self.cache, self.key = cache, key

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prev = self.cache._kv.get(self.key)
        if prev is not None:
            k, v = torch.cat([prev[0], k], dim=1), torch.cat([prev[1], v], dim=1)
        self.cache._kv[self.key] = (k, v)
        return k, v
