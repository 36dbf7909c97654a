"""Test probe: the KV caches the rollout sampler creates in this process, to read what decoding holds.

Meant for forked ranks (dist_harness.run_ranks): the patch of `generation.decoding.KVCache` dies with
the rank, so no other test sees it.
"""

from __future__ import annotations


def record_kv_caches() -> list:
    """From now on every KVCache the sampler builds is appended to the returned list."""
    import scaletrain.generation.decoding as decoding

    caches: list = []

    class Recorded(decoding.KVCache):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            caches.append(self)

    decoding.KVCache = Recorded  # type: ignore[misc]
    return caches
