#!/usr/bin/env bash
# A real single-host SLURM cluster for tests: munge, slurmctld and two emulated nodes (node1, node2)
# on 127.0.0.1, from Debian's slurm-wlm packages. Usage: local_slurm.sh install|start|stop|status.
# start and stop are idempotent; start writes the config first and waits until both nodes are idle.
set -euo pipefail

SPOOL=/var/spool/moe-slurm
LOGS=/var/log/moe-slurm
PIDS=/run/moe-slurm
CONF=/etc/slurm/slurm.conf
NODES=(node1 node2)
CPUS_PER_NODE=8  # declared, not real: slurmd's config_overrides lets a node claim more CPUs than the host has

log() { echo "local_slurm: $*" >&2; }

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        log "slurm-wlm and munge already installed"
        return
    fi
    [ "$(id -u)" -eq 0 ] || { log "error: installing needs root"; exit 1; }
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_config() {
    mkdir -p /etc/slurm "$SPOOL/ctld" "$LOGS" "$PIDS"
    # The clients read this file too: without it they look for the controller in DNS.
    cat >"$CONF.tmp" <<EOF
# Written by scripts/local_slurm.sh: a test cluster on 127.0.0.1 only.
ClusterName=moelaunch
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=16817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/%n
SlurmctldPidFile=$PIDS/slurmctld.pid
SlurmdPidFile=$PIDS/slurmd-%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SlurmctldParameters=preempt_send_user_signal
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
NodeName=node[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[17001-17002] CPUs=$CPUS_PER_NODE State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
    # Emulated node names must resolve (srun, torchrun's rendezvous).
    grep -qE "^127\.0\.0\.1[[:space:]]+node1 node2\$" /etc/hosts || echo "127.0.0.1 node1 node2" >>/etc/hosts
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    [ -s /etc/munge/munge.key ] || { mungekey --create --force 2>/dev/null || create-munge-key -f; }
    chown munge:munge /etc/munge/munge.key
    chmod 600 /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    log "error: munged did not start"
    exit 1
}

start() {
    command -v slurmctld >/dev/null || { log "error: slurm-wlm is not installed; run: $0 install"; exit 1; }
    write_config
    start_munge
    alive "$PIDS/slurmctld.pid" || slurmctld
    for node in "${NODES[@]}"; do
        mkdir -p "$SPOOL/$node"
        alive "$PIDS/slurmd-$node.pid" || slurmd -N "$node"
    done
    for _ in $(seq 150); do
        local idle
        idle=$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -cE ' (idle|mix|alloc)$' || true)
        if [ "$idle" -ge "${#NODES[@]}" ]; then
            log "up: ${NODES[*]} ($CPUS_PER_NODE CPUs each) on 127.0.0.1"
            return
        fi
        # A node left down by an earlier unclean stop comes back on its own (ReturnToService=2) or here.
        scontrol update nodename=node[1-2] state=resume >/dev/null 2>&1 || true
        sleep 0.2
    done
    log "error: nodes did not come up; see $LOGS"
    sinfo -N >&2 || true
    exit 1
}

stop_pid() {
    local pidfile=$1
    alive "$pidfile" || { rm -f "$pidfile"; return; }
    local pid
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; return; }
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
}

stop() {
    for node in "${NODES[@]}"; do
        stop_pid "$PIDS/slurmd-$node.pid"
    done
    stop_pid "$PIDS/slurmctld.pid"
    log "stopped"
}

status() {
    alive "$PIDS/slurmctld.pid" || { echo "slurmctld not running"; exit 1; }
    sinfo -N
}

case "${1:-}" in
install) install ;;
start) start ;;
stop) stop ;;
status) status ;;
*)
    echo "usage: $0 install|start|stop|status" >&2
    exit 2
    ;;
esac
