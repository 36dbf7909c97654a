"""Knowledge distillation: a student matches a frozen teacher's next-token distributions, on data or on its own samples."""
