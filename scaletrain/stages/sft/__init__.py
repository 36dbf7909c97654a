"""Supervised fine-tuning on chat rows: rendered, masked, packed conversations; token cross-entropy on the targets."""
