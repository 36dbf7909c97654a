"""nemo-run launchers for scaletrain (outside the installed library; needs the `launch` extra).

`python -m launch.pretrain` submits or runs one job; `python -m launch.sweep` runs a set of parallel
layouts of one config for profiling. Both only use scaletrain's public config API to reject a bad
config or layout before anything is submitted.
"""
