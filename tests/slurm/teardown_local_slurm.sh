#!/usr/bin/env bash
# Stops the local test cluster started by tests/slurm/setup_local_slurm.sh: cancels its jobs, stops the
# slurmd/slurmctld daemons (by the pids in their pid files), munged if setup started it, and removes the
# /etc/hosts lines setup added. `--purge` also deletes SLURM_LOCAL_DIR (state, spool, logs).
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/megatron-tst-slurm}
CONF="$DIR/etc/slurm.conf"
HOSTS_MARK="# megatron-tst-local-slurm"
PURGE=0
[[ ${1:-} == --purge ]] && PURGE=1

log() { printf '[teardown_local_slurm] %s\n' "$*"; }

stop_pidfile() {   # stop_pidfile FILE NAME: TERM, wait up to 10 s, then KILL
    local pid i
    [[ -s $1 ]] || return 0
    pid=$(<"$1")
    if [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
        log "stopping $2 (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            log "$2 still alive after 10 s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$1"
}

if [[ -f $CONF ]]; then
    export SLURM_CONF="$CONF"
    jobs=$(timeout 10 squeue -h -o '%i' 2>/dev/null || true)
    if [[ -n $jobs ]]; then
        log "cancelling jobs: $(paste -sd' ' <<<"$jobs")"
        # shellcheck disable=SC2086  # one id per word
        timeout 10 scancel $jobs 2>/dev/null || true
        for ((i = 0; i < 30; i++)); do
            [[ -z $(timeout 10 squeue -h -o '%i' 2>/dev/null || true) ]] && break
            sleep 1
        done
    fi
fi

for f in "$DIR"/run/slurmd.*.pid; do
    [[ -e $f ]] || continue
    n=${f##*/slurmd.}
    stop_pidfile "$f" "slurmd ${n%.pid}"
done
stop_pidfile "$DIR/run/slurmctld.pid" slurmctld

if [[ -f $DIR/run/munged.ours ]]; then
    stop_pidfile /run/munge/munged.pid munged
    rm -f "$DIR/run/munged.ours"
fi

if grep -qF "$HOSTS_MARK" /etc/hosts 2>/dev/null; then
    log "removing the node names from /etc/hosts"
    # rewrite in place (/etc/hosts may be a bind mount: keep the inode)
    kept=$(grep -vF "$HOSTS_MARK" /etc/hosts || true)
    printf '%s\n' "$kept" >/etc/hosts
fi

if ((PURGE)); then
    log "removing $DIR"
    rm -rf "$DIR"
fi
log "done"
