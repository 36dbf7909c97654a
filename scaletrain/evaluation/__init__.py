"""Evaluation: log-likelihood and generation tasks from local files, scored in any parallel layout."""
