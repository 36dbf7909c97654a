"""Post-training: objectives (SFT, DPO, … in later issues) and generation."""
