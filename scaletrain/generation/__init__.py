"""Generation on the training layout: the sampler with its KV-cache decoding engine, scoring passes, one-turn helpers."""
