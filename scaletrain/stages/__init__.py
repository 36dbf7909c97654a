"""Training stages — pretraining and every post-training objective — one subpackage each, registered in `registry.py`."""
