"""Keys and values of the tokens decoded so far, per layer, for incremental decoding (rollouts).

Placement: each tensor is [b, s, kv_heads/tp, d], local to its tp rank (a rank caches the heads it
computes), on the device the layer runs on. Only the model's forward appends to it; a cache serves
one batch of rows from its first (prompt) call to its last token, and is dropped with it. The
sampler may drop finished rows from it (`keep`), the same rows on every rank of the replica.

With a `capacity` (positions: prompt width + new tokens − 1) each layer's buffers are allocated
once, on the first call, and every later token is written in place: concatenating instead copies
the whole cache per token, O(length²) memory traffic over a completion.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self._kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # buffers (capacity positions, when set)
        self._used: dict[str, int] = {}  # positions written per layer

    def layer(self, key: str) -> LayerCache:
        return LayerCache(self, key)

    @property
    def length(self) -> int:
        """Positions cached so far (0 before the first call)."""
        return next(iter(self._used.values())) if self._used else 0

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (indices into the current rows, in order) in every layer: finished
        completions leave the batch, so later tokens are computed for the running ones only."""
        for key, (k, v) in self._kv.items():
            index = torch.tensor(rows, dtype=torch.long, device=k.device)
            self._kv[key] = (k.index_select(0, index), v.index_select(0, index))


class LayerCache:
    """One layer's view of a KVCache: `extend` appends this call's keys/values, returns all of them."""

    def __init__(self, cache: KVCache, key: str) -> None:
        self.cache, self.key = cache, key

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, n = self.cache, k.shape[1]
        prev = c._kv.get(self.key)
        used = c._used.get(self.key, 0)
        if c.capacity is None:
            if prev is not None:
                k, v = torch.cat([prev[0], k], dim=1), torch.cat([prev[1], v], dim=1)
            c._kv[self.key], c._used[self.key] = (k, v), used + n
            return k, v
        if used + n > c.capacity:
            raise ValueError(f"KV cache full: {used} + {n} positions > capacity {c.capacity}")
        if prev is None:
            prev = (k.new_empty((k.shape[0], c.capacity, *k.shape[2:])), v.new_empty((v.shape[0], c.capacity, *v.shape[2:])))
            c._kv[self.key] = prev
        prev[0][:, used:used + n] = k
        prev[1][:, used:used + n] = v
        c._used[self.key] = used + n
        return prev[0][:, :used + n], prev[1][:, :used + n]
