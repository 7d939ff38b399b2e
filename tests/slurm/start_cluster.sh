#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for CI and for trying profiles/ci-slurm by hand.
#
#   tests/slurm/start_cluster.sh         start munged, slurmctld and slurmd; wait for an idle node
#   tests/slurm/start_cluster.sh stop    stop the three daemons this script started (by pid file)
#
# Needs root and Debian's packages:  apt-get install -y slurmctld slurmd slurm-client munge
# State and logs go to $DAUNCE_SLURM_STATE (default /tmp/daunce-slurm). The configuration is
# installed as /etc/slurm/slurm.conf, where every SLURM command looks: a SLURM_CONF variable
# would not do, because the plugin's job step removes SLURM_* variables before it calls srun
# inside the job. A slurm.conf that was there before is kept aside and put back by "stop".
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
STATE=${DAUNCE_SLURM_STATE:-/tmp/daunce-slurm}
# the machine's host name is not "localhost": slurmd is started with -N so the names agree
NODE=localhost
CONF=/etc/slurm/slurm.conf
MARK="# daunce CI cluster (tests/slurm/start_cluster.sh)"

log() { echo "[slurm-ci] $*" >&2; }

stop() {
  local f pid
  for f in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" "$STATE/munged.pid"; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
      log "stopped $(basename "$f" .pid) (pid $pid)"
    fi
    rm -f "$f"
  done
  if [ -f "$CONF" ] && head -1 "$CONF" | grep -qF "$MARK"; then
    rm -f "$CONF"
    [ -f "$STATE/slurm.conf.orig" ] && mv "$STATE/slurm.conf.orig" "$CONF"
  fi
  return 0
}

if [ "${1:-}" = stop ]; then
  stop
  exit 0
fi

[ "$(id -u)" = 0 ] || { log "must run as root (it starts munged, slurmctld and slurmd)"; exit 1; }
for b in munged slurmctld slurmd sbatch squeue sinfo scontrol; do
  command -v "$b" >/dev/null || { log "$b not found: apt-get install -y slurmctld slurmd slurm-client munge"; exit 1; }
done

stop  # a previous run's daemons, if any
rm -rf "$STATE/ctld" "$STATE/d"
mkdir -p "$STATE/ctld" "$STATE/d"

# munge: a key readable only by the munge user, and munged running as that user
if [ ! -s /etc/munge/munge.key ]; then
  install -d -o munge -g munge -m 700 /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
install -d -o munge -g munge -m 755 /run/munge
install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
cp /run/munge/munged.pid "$STATE/munged.pid"
munge -n | unmunge >/dev/null || { log "munge does not work"; exit 1; }

# the node's real CPUs and memory (slurmd drains a node that claims more than it has)
read -r CPUS MEM < <(slurmd -C | awk '/^NodeName/ {for (i=1;i<=NF;i++) {split($i,kv,"="); v[kv[1]]=kv[2]}; print v["CPUs"], v["RealMemory"]}')
MEM=$(( MEM > 2048 ? MEM - 1024 : MEM ))  # leave the daemons and the Snakemake driver room
DEF_MEM=$(( MEM / CPUS < 2000 ? MEM / CPUS : 2000 ))
if [ -f "$CONF" ] && ! head -1 "$CONF" | grep -qF "$MARK"; then
  mv "$CONF" "$STATE/slurm.conf.orig"
  log "kept the existing $CONF as $STATE/slurm.conf.orig (restored by: $0 stop)"
fi
mkdir -p "$(dirname "$CONF")"
{ echo "$MARK"
  sed -e "s|@NODE@|$NODE|g" -e "s|@STATE@|$STATE|g" -e "s|@CPUS@|$CPUS|g" -e "s|@MEM@|$MEM|g" \
      -e "s|@DEF_MEM@|$DEF_MEM|g" -e "s|@CTLD_PORT@|${DAUNCE_SLURMCTLD_PORT:-6817}|g" \
      -e "s|@D_PORT@|${DAUNCE_SLURMD_PORT:-6818}|g" "$HERE/slurm.conf.in"; } > "$CONF"

slurmctld
slurmd -N "$NODE"
for _ in $(seq 60); do
  state=$(sinfo -h -N -o %T 2>/dev/null | head -1 || true)
  [ "$state" = idle ] && break
  sleep 1
done
if [ "$state" != idle ]; then
  log "node did not become idle (state: ${state:-none}); logs: $STATE/slurmctld.log $STATE/slurmd.log"
  tail -20 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 || true
  exit 1
fi
log "cluster up: node $NODE, $CPUS CPUs, $MEM MB (DefMemPerCPU $DEF_MEM MB), $CONF, logs in $STATE"
