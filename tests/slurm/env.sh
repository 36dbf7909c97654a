# source tests/slurm/env.sh: point Slurm's client commands at the local test cluster.
export SLURM_CONF=${SCALETRAIN_SLURM_DIR:-/tmp/scaletrain-slurm}/slurm.conf
