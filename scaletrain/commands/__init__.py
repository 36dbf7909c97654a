"""Entry points, one module per command: parse arguments, hand a validated config on, report. `cli.py` only dispatches."""
