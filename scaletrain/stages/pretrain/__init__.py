"""Pretraining: next-token cross-entropy on tokenized documents (data.prefixes)."""
