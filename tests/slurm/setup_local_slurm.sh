#!/usr/bin/env bash
# Local SLURM "cluster" on this one machine, for testing the launch/ scripts (no GPUs, no systemd).
#
#   tests/slurm/setup_local_slurm.sh          # install (apt) + configure + start; idempotent
#   source "${SLURM_LOCAL_DIR:-/tmp/megatron-tst-slurm}/env.sh"   # exports SLURM_CONF for sbatch/squeue/...
#   tests/slurm/teardown_local_slurm.sh       # stop the daemons
#
# What it sets up (Debian 12, slurm-wlm 22.05, as root):
#   * munged (started directly, as the munge user) if `munge -n | unmunge` does not already work;
#   * slurmctld + SLURM_LOCAL_NODES slurmd daemons (default 2) started directly, no systemd. Each slurmd
#     is a separate SLURM node (`slurmd -N <name>`, own Port, own spool/log/pid files via %n) on this
#     one host; node names are made resolvable with /etc/hosts lines (marked, removed by teardown)
#     so that `scontrol show hostnames` output can be used as MASTER_ADDR like on a real cluster.
#     If the nodes do not all come up, it falls back to one node named after this host.
#   * proctrack/linuxproc, task/none, select/cons_tres (CR_Core: memory is not a consumable),
#     JobRequeue=1, one default partition, everything (config, state, spool, logs, pids) under
#     SLURM_LOCAL_DIR. The config is $SLURM_LOCAL_DIR/etc/slurm.conf, used via SLURM_CONF.
#
# Environment: SLURM_LOCAL_DIR (default /tmp/megatron-tst-slurm), SLURM_LOCAL_NODES (default 2),
# SLURM_LOCAL_PORT_BASE (default 16817: slurmctld on it, slurmd i on base+i),
# SLURM_LOCAL_TIMEOUT (seconds to wait for the nodes, default 60), SLURM_LOCAL_NO_INSTALL=1 (skip apt).
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/megatron-tst-slurm}
NODES_WANTED=${SLURM_LOCAL_NODES:-2}
PORT_BASE=${SLURM_LOCAL_PORT_BASE:-16817}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
CONF="$DIR/etc/slurm.conf"
HOSTS_MARK="# megatron-tst-local-slurm"
SBIN=/usr/sbin

log() { printf '[setup_local_slurm] %s\n' "$*"; }
die() { printf '[setup_local_slurm] ERROR: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (starts munged/slurmctld/slurmd and may apt-get install)"

# ---------------------------------------------------------------------------------------------- install
install_packages() {
    local missing=()
    command -v "$SBIN/slurmctld" >/dev/null || missing+=(slurmctld)
    command -v "$SBIN/slurmd" >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v "$SBIN/munged" >/dev/null || missing+=(munge)
    ((${#missing[@]} == 0)) && return 0
    [[ ${SLURM_LOCAL_NO_INSTALL:-0} == 1 ]] && die "missing ${missing[*]} and SLURM_LOCAL_NO_INSTALL=1"
    log "installing slurm-wlm munge (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    # slurm-wlm = slurmctld + slurmd + slurm-client; its recommends (accounting/profiling plugins) are not needed.
    if ! { apt-get update -q && apt-get install -y -q --no-install-recommends slurm-wlm munge; } >"$DIR/log/apt.log" 2>&1; then
        tail -n 20 "$DIR/log/apt.log" >&2
        die "apt-get install slurm-wlm munge failed (log: $DIR/log/apt.log)"
    fi
}

# ------------------------------------------------------------------------------------------------ munge
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_ok; then
        log "munged already running"
        return 0
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then
            mungekey --create --force --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=128 count=1 status=none
        fi
    fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
    chmod 0700 /etc/munge /var/log/munge
    chmod 0400 /etc/munge/munge.key
    chmod 0755 /run/munge
    rm -f /run/munge/munged.pid
    log "starting munged"
    runuser -u munge -- "$SBIN/munged"
    touch "$DIR/run/munged.ours"   # teardown stops munged only if this script started it
    local i
    for ((i = 0; i < 50; i++)); do
        munge_ok && return 0
        sleep 0.2
    done
    die "munged does not answer (see /var/log/munge/munged.log)"
}

# --------------------------------------------------------------------------------------------- helpers
pid_alive() {   # pid_alive PIDFILE -> 0 if the process in PIDFILE runs
    local pid
    [[ -s $1 ]] || return 1
    pid=$(<"$1")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

node_names() {   # the node names of the config in use, one per line
    sed -n 's/^NodeName=\([^ ]*\).*/\1/p' "$CONF"
}

daemons_up() {
    [[ -f $CONF ]] || return 1
    pid_alive "$DIR/run/slurmctld.pid" || return 1
    local n
    for n in $(node_names); do
        pid_alive "$DIR/run/slurmd.$n.pid" || return 1
    done
}

all_nodes_idle() {   # every configured node is idle (or allocated/mixed: up and usable)
    local states
    states=$(sinfo -h -N -o '%t' 2>/dev/null | sort -u) || return 1
    [[ -n $states ]] || return 1
    ! grep -qvE '^(idle|alloc|mix|comp)$' <<<"$states"
}

wait_nodes() {
    local deadline=$((SECONDS + TIMEOUT)) n
    while ((SECONDS < deadline)); do
        all_nodes_idle && return 0
        # nodes registered after a restart come back DOWN ("unexpectedly rebooted") until resumed
        for n in $(sinfo -h -N -t down,drain -o '%N' 2>/dev/null | sort -u); do
            scontrol update NodeName="$n" State=RESUME >/dev/null 2>&1 || true
        done
        sleep 1
    done
    return 1
}

hosts_add() {   # make the node names resolvable (they all live on 127.0.0.1)
    local n
    for n in "$@"; do
        getent hosts "$n" >/dev/null && continue
        log "adding '127.0.0.1 $n' to /etc/hosts"
        printf '127.0.0.1 %s %s\n' "$n" "$HOSTS_MARK" >>/etc/hosts
    done
}

# ---------------------------------------------------------------------------------------------- config
write_conf() {   # write_conf NODE...
    local host mem_mb cpus n i=0 nodelines=""
    host=$(hostname -s)
    cpus=$(nproc)
    # a bit below the memory available now, split over the nodes sharing this machine
    mem_mb=$(awk '/^MemAvailable:/ {print int($2 / 1024 * 0.85)}' /proc/meminfo)
    mem_mb=$((mem_mb / $#))
    for n in "$@"; do
        i=$((i + 1))
        nodelines+="NodeName=$n NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT_BASE + i)) CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"$'\n'
    done
    mkdir -p "$DIR/etc"
    cat >"$CONF" <<EOF
# Generated by tests/slurm/setup_local_slurm.sh: a local test cluster, not for production.
ClusterName=tstlocal
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT_BASE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# schedule every few seconds (default 60 s) so that requeued jobs restart promptly in tests
SchedulerParameters=sched_interval=5,bf_interval=5
# a requeued job waits cred_expire seconds before it may start again (default 120 s)
AuthInfo=cred_expire=30
JobRequeue=1
ReturnToService=2
# keep finished jobs visible to scontrol for an hour (tests read JobState/Restarts/ExitCode)
MinJobAge=3600
KillWait=30
InactiveLimit=0
SlurmctldTimeout=120
SlurmdTimeout=300
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd.%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
$nodelines
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    printf 'export SLURM_CONF=%q\n' "$CONF" >"$DIR/env.sh"
}

# ------------------------------------------------------------------------------------------ start/stop
stop_daemons() {   # stop what a previous (partial) start left; pids from our pid files only
    local f pid i
    for f in "$DIR"/run/slurmd.*.pid "$DIR/run/slurmctld.pid"; do
        [[ -s $f ]] || continue
        pid=$(<"$f")
        if [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
        fi
        rm -f "$f"
    done
}

start_daemons() {   # start_daemons NODE...
    local n
    mkdir -p "$DIR/state" "$DIR/log" "$DIR/run"
    for n in "$@"; do mkdir -p "$DIR/spool/slurmd.$n"; done
    # -c: cold start (no jobs from an earlier incarnation of this test cluster)
    "$SBIN/slurmctld" -c -f "$CONF"
    for n in "$@"; do
        "$SBIN/slurmd" -f "$CONF" -N "$n"
    done
}

try_nodes() {   # try_nodes NODE... : configure, start, wait until all idle
    write_conf "$@"
    export SLURM_CONF="$CONF"
    start_daemons "$@"
    wait_nodes
}

# ------------------------------------------------------------------------------------------------ main
t0=$SECONDS
mkdir -p "$DIR/run" "$DIR/log"
install_packages
t_install=$((SECONDS - t0))
start_munge

export SLURM_CONF="$CONF"
if daemons_up && wait_nodes; then
    log "already running: $(node_names | paste -sd' ') (SLURM_CONF=$CONF)"
    exit 0
fi
stop_daemons

mode=""
if ((NODES_WANTED > 1)); then
    names=()
    for ((i = 1; i <= NODES_WANTED; i++)); do names+=("tstnode$i"); done
    hosts_add "${names[@]}"
    if try_nodes "${names[@]}"; then
        mode="$NODES_WANTED nodes on one host (one slurmd per node: slurmd -N NAME, distinct Port)"
    else
        log "WARNING: $NODES_WANTED slurmd daemons on one host did not all come up; falling back to one node"
        sinfo -N -l >&2 || true
        tail -n 20 "$DIR"/log/slurmd.*.log >&2 || true
        stop_daemons
    fi
fi
if [[ -z $mode ]]; then
    try_nodes "$(hostname -s)" || { tail -n 30 "$DIR"/log/*.log >&2; die "node did not come up"; }
    mode="1 node"
fi
log "up: $mode; install ${t_install}s, total $((SECONDS - t0))s"
sinfo -N -o '%N %t %c %m %P'
log "use: source $DIR/env.sh   (or export SLURM_CONF=$CONF)"
