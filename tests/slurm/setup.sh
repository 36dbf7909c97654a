#!/usr/bin/env bash
# A real Slurm cluster on this one machine, for the launch tests: munged + slurmctld on the host and
# one slurmd per emulated node, each node in its own network namespace (own address, own hostname).
#
#   bash tests/slurm/setup.sh [--nodes N]    install if missing, configure, start, wait until idle
#   bash tests/slurm/setup.sh --teardown     stop only the daemons this script started (pid files)
#
# Idempotent: a cluster that is already up with the same node count, all idle and no jobs queued, is left alone. Everything lives
# in $SCALETRAIN_SLURM_DIR (default /tmp/scaletrain-slurm); clients find it through SLURM_CONF, which
# `source tests/slurm/env.sh` exports. Needs root (daemons, namespaces); no systemd, no cgroups.
#
# Why these settings (Debian 12, Slurm 22.05): proctrack/linuxproc + task/none need no cgroups;
# CR_Core lets several jobs share a node; MinJobAge keeps finished jobs visible to `scontrol show job`
# (no slurmdbd, so no sacct; jobcomp/filetxt records every job); cred_expire=10 makes a requeued job
# start again after ~11 s instead of ~121 s; batch_sched_delay=0 starts jobs at once.
set -euo pipefail

DIR=${SCALETRAIN_SLURM_DIR:-/tmp/scaletrain-slurm}
NODES=2
TEARDOWN=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --nodes) NODES=$2; shift 2 ;;
    --teardown) TEARDOWN=1; shift ;;
    *) echo "setup.sh: unknown argument $1 (use --nodes N or --teardown)" >&2; exit 2 ;;
  esac
done

SUBNET=10.77.0
BRIDGE=stslurm0
CTL_ADDR=$SUBNET.1
HOSTS_MARK="# scaletrain-slurm"

log() { echo "[slurm-setup] $*"; }

stop_pid_file() {  # stop the daemon whose pid is in $1 (only if it is still that daemon), wait for it
  local f=$1 pid
  [[ -f $f ]] || return 0
  pid=$(cat "$f")
  if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

teardown() {
  for f in "$DIR"/run/slurmd.*.pid; do [[ -e $f ]] && stop_pid_file "$f"; done
  stop_pid_file "$DIR/run/slurmctld.pid"
  stop_pid_file "$DIR/run/munged.pid"
  # Jobs and their slurmstepd outlive slurmd and would keep a namespace (and its veth) alive after
  # `ip netns del`: every process left in a node's namespace goes too.
  for ns in $(ip netns list 2>/dev/null | awk '/^stslurm-/{print $1}'); do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns" || true
  done
  for i in $(seq 64); do ip link del "stsl$i-h" 2>/dev/null || true; done
  ip link del "$BRIDGE" 2>/dev/null || true
  sed -i "/$HOSTS_MARK/d" /etc/hosts 2>/dev/null || true
  log "stopped"
}

if [[ $TEARDOWN == 1 ]]; then teardown; exit 0; fi
[[ $(id -u) == 0 ]] || { echo "setup.sh: needs root (it starts slurm daemons and network namespaces)" >&2; exit 2; }

export SLURM_CONF=$DIR/slurm.conf
# Reused only when every node is idle: a node still busy with a job of an earlier run (a killed CI run leaves
# one behind in the saved state) would never become idle for the tests.
if [[ -f $DIR/nodes ]] && [[ $(cat "$DIR/nodes") == "$NODES" ]] && ! squeue -h 2>/dev/null | grep -q . \
   && [[ $(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l) == "$NODES" ]]; then
  log "cluster with $NODES idle node(s) already up"; exit 0
fi
teardown >/dev/null
# A fresh cluster starts from empty state: slurmctld would otherwise recover the jobs of the last run
# (and their nodes with them) from StateSaveLocation.
rm -rf "$DIR"/state "$DIR"/spool "$DIR"/log

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  log "installing slurm-wlm and munge"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1 \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null; }
fi

mkdir -p "$DIR"/{run,log,state,spool}
echo "$NODES" > "$DIR/nodes"

# munge: one daemon; its unix socket is reachable from every network namespace.
mkdir -p /run/munge /etc/munge /var/lib/munge /var/log/munge
[[ -s /etc/munge/munge.key ]] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
chown -R munge:munge /run/munge /etc/munge /var/lib/munge /var/log/munge
chmod 400 /etc/munge/munge.key
chmod 755 /run/munge
if ! pgrep -x munged >/dev/null; then
  su -s /bin/sh munge -c "munged --pid-file=/run/munge/munged.pid"
  cp /run/munge/munged.pid "$DIR/run/munged.pid" 2>/dev/null || pgrep -x munged > "$DIR/run/munged.pid"
fi

# Network: a bridge on the host (controller address) and one namespace + veth per node.
ip link add "$BRIDGE" type bridge
ip addr add "$CTL_ADDR/24" dev "$BRIDGE"
ip link set "$BRIDGE" up
for i in $(seq "$NODES"); do
  ns=stslurm-n$i
  ip netns add "$ns"
  ip link add "stsl$i-h" type veth peer name "stsl$i-n"
  ip link set "stsl$i-h" master "$BRIDGE" up
  ip link set "stsl$i-n" netns "$ns"
  ip -n "$ns" addr add "$SUBNET.$((10 + i))/24" dev "stsl$i-n"
  ip -n "$ns" link set "stsl$i-n" up
  ip -n "$ns" link set lo up
  echo "$SUBNET.$((10 + i)) n$i $HOSTS_MARK" >> /etc/hosts
done
HOST=$(hostname -s)

# The node line is the machine's own topology (`slurmd -C`): more CPUs or memory than exist make a
# node invalid. Every emulated node claims the whole machine; Slurm cannot tell they share it.
TOPO=$(slurmd -C | head -n1 | sed 's/^NodeName=[^ ]* //')
{
  cat <<EOF
ClusterName=scaletrain-ci
SlurmctldHost=$HOST($CTL_ADDR)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
MinJobAge=86400
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
KillWait=10
InactiveLimit=0
EOF
  for i in $(seq "$NODES"); do
    echo "NodeName=n$i NodeAddr=$SUBNET.$((10 + i)) NodeHostname=n$i $TOPO State=UNKNOWN"
  done
  echo "PartitionName=ci Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
} > "$SLURM_CONF"

slurmctld -f "$SLURM_CONF"
for i in $(seq "$NODES"); do
  # nsenter (not `ip netns exec`, which remounts /sys and kills slurmd's cgroup probe); own hostname
  # through a UTS namespace so that jobs on the node see `hostname` = n$i.
  nsenter --net=/run/netns/stslurm-n$i unshare --uts sh -c \
    "hostname n$i && exec slurmd -N n$i -f '$SLURM_CONF'"
done

for _ in $(seq 300); do
  if [[ $(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l) == "$NODES" ]]; then
    log "cluster up: $NODES idle node(s), SLURM_CONF=$SLURM_CONF"; exit 0
  fi
  sleep 0.2
done
echo "setup.sh: nodes did not become idle within 60 s:" >&2
sinfo -N -l >&2 || true
tail -n 20 "$DIR"/log/*.log >&2 || true
exit 1
