#!/usr/bin/env bash
# End-to-end test of the SLURM launch plumbing on a local test cluster (tests/slurm/setup_local_slurm.sh):
#
#   1. complete: submit launch/train_dense.sbatch with a tiny CPU configuration (2 ranks: 2 nodes x 1, or
#      1 node x 2 when only one SLURM node could be set up; gloo) and check it finished, went through both
#      TST phases and left a checkpoint at the last iteration;
#   2. preempt: submit it again (fresh checkpoint dir), send the preemption warning the way SLURM does
#      (SIGUSR1 to the batch shell: `scancel --batch --signal=USR1`), and check that the trainer saved on the
#      signal, the job requeued itself, resumed from that checkpoint and completed;
#   3. cancel: a plain `scancel` (SIGTERM) ends the job for good: CANCELLED, not requeued;
#   4. timelimit, only on request (about 6 more minutes): --time=3 and SLURM's own `--signal=B:USR1@120`
#      warning, requeued run after run until the training is done.
# E2E_PHASES selects them [complete preempt cancel]; E2E_TIME_LIMIT=1 adds timelimit.
#
#   sudo tests/slurm/run_slurm_e2e.sh            # as root; leaves the cluster running (teardown: see below)
#   E2E_TEARDOWN=1 tests/slurm/run_slurm_e2e.sh  # stop the daemons at the end
#
# The trainer is switchable: TRAINER (default: the stand-in tests/slurm/fake_trainer.py, run with the repo's
# .venv python). For the real trainer with a tiny config, e.g.
#   TRAINER="python -m megatron_tst.pretrain" E2E_RECIPE=270m \
#   E2E_EXTRA_ARGS="--distributed-backend gloo --num-layers 2 --hidden-size 64 ..." E2E_ITERS_COMPLETE=10 \
#   E2E_ITERS_PREEMPT=40 E2E_JOB_TIMEOUT=900 tests/slurm/run_slurm_e2e.sh
# The checks are trainer-agnostic (job state, the launch script's requeue log line, Megatron's
# latest_checkpointed_iteration.txt) except the phase check, which greps the job log for the words
# "superposition" and "recovery" (the trainer is expected to log its TST phase).
#
# Knobs (environment): E2E_WORK_DIR [mktemp under /tmp], E2E_NODES/E2E_NPROC [from the cluster],
# E2E_ITERS_COMPLETE [20], E2E_ITERS_PREEMPT [60], E2E_SAVE_INTERVAL [10], E2E_PREEMPT_AFTER_ITER [15],
# FAKE_TRAINER_ITER_SECONDS [0.3], E2E_JOB_TIMEOUT [300 s per job phase], E2E_TEARDOWN [0],
# E2E_PHASES, E2E_TIME_LIMIT [0], E2E_ITERS_TIME_LIMIT [700],
# PYTHON [repo .venv/bin/python], TORCHRUN [next to PYTHON].
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
TORCHRUN=${TORCHRUN:-$(dirname "$PYTHON")/torchrun}
WORK=${E2E_WORK_DIR:-$(mktemp -d /tmp/tst-slurm-e2e.XXXXXX)}
JOB_TIMEOUT=${E2E_JOB_TIMEOUT:-300}
ITERS_COMPLETE=${E2E_ITERS_COMPLETE:-20}
ITERS_PREEMPT=${E2E_ITERS_PREEMPT:-60}
PREEMPT_AFTER_ITER=${E2E_PREEMPT_AFTER_ITER:-15}
PHASES=${E2E_PHASES:-complete preempt cancel}
if [[ ${E2E_TIME_LIMIT:-0} == 1 ]]; then PHASES+=" timelimit"; fi
FAILS=0
T_START=$SECONDS

say() { printf '[e2e %(%T)T] %s\n' -1 "$*"; }
pass() { printf 'PASS: %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*"; FAILS=$((FAILS + 1)); }
want() { [[ " $PHASES " == *" $1 "* ]]; }
check() {   # check DESCRIPTION COMMAND...
    local what=$1
    shift
    if "$@"; then pass "$what"; else fail "$what"; fi
}

job_field() {   # job_field JOBID FIELD -> value from `scontrol show job -o`
    timeout 10 scontrol show job -o "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p" | head -n1
}

# wait_until TIMEOUT DESCRIPTION COMMAND...: poll every second
wait_until() {
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    while ((SECONDS < deadline)); do
        "$@" && return 0
        sleep 1
    done
    say "timed out after $1 s waiting for: $what"
    return 1
}

# shellcheck disable=SC2317  # called through wait_until
job_finished() {
    case $(job_field "$1" JobState) in
        COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE | PREEMPTED) return 0 ;;
        *) return 1 ;;
    esac
}
# shellcheck disable=SC2317  # called through wait_until
job_restarted_or_done() { [[ $(job_field "$1" Restarts) -ge 1 ]] || job_finished "$1"; }
# shellcheck disable=SC2317  # called through wait_until
job_running_since_iter() {   # job_running_since_iter LOG N: the log shows iteration >= N
    local last
    last=$(grep -oE 'iteration +[0-9]+/' "$1" 2>/dev/null | tail -n1 | grep -oE '[0-9]+')
    [[ -n $last && $last -ge $2 ]]
}
tracker() { tr -d '[:space:]' 2>/dev/null <"$1/latest_checkpointed_iteration.txt"; }

dump_job() {   # on failure: show what happened
    say "---- scontrol show job $1"
    timeout 10 scontrol show job "$1" 2>&1 | sed 's/^/    /'
    say "---- log $2 (last 40 lines)"
    tail -n 40 "$2" 2>/dev/null | sed 's/^/    /'
    say "---- stderr ${2%.out}.err (last 20 lines)"
    tail -n 20 "${2%.out}.err" 2>/dev/null | sed 's/^/    /'
}

# submit NAME CKPT_DIR TRAIN_ITERS [SBATCH_ARG...] -> prints the job id; the extra sbatch arguments come last,
# so they override the defaults here (e.g. --time)
submit() {
    local name=$1 ckpt=$2 iters=$3
    shift 3
    CKPT_DIR=$ckpt TRAIN_ITERS=$iters timeout 30 sbatch --parsable \
        --job-name="$name" --nodes="$NODES" --gpus-per-node=0 --time=00:20:00 \
        --chdir="$WORK" --output="$WORK/logs/%x-%j.out" --error="$WORK/logs/%x-%j.err" \
        "$@" "$ROOT/launch/train_dense.sbatch"
}

# start_job WHAT NAME CKPT_DIR TRAIN_ITERS [SBATCH_ARG...]: submit; set JOB and LOG, or count a FAIL and return 1
start_job() {
    local what=$1
    shift
    JOB="" LOG=""
    if ! JOB=$(submit "$@") || [[ -z $JOB ]]; then
        fail "sbatch ($what)"
        return 1
    fi
    LOG="$WORK/logs/$1-$JOB.out"
    say "job $JOB, log $LOG"
}

# ------------------------------------------------------------------------------------------ cluster
[[ $(id -u) -eq 0 ]] || { echo "FAIL: run as root (sets up SLURM)"; exit 1; }
say "work dir $WORK"
mkdir -p "$WORK/logs"
t0=$SECONDS
if ! bash "$ROOT/tests/slurm/setup_local_slurm.sh"; then
    echo "FAIL: local SLURM setup"
    exit 1
fi
T_SETUP=$((SECONDS - t0))
# shellcheck disable=SC1091  # written by setup_local_slurm.sh
source "${SLURM_LOCAL_DIR:-/tmp/megatron-tst-slurm}/env.sh"
N_SLURM_NODES=$(sinfo -h -N -o '%N' | sort -u | wc -l)
if [[ -z ${E2E_NODES:-} ]]; then
    if ((N_SLURM_NODES >= 2)); then NODES=2 NPROC=1; else NODES=1 NPROC=2; fi
else
    NODES=$E2E_NODES
fi
NPROC=${E2E_NPROC:-$NPROC}
say "cluster: $N_SLURM_NODES SLURM node(s); test layout $NODES node(s) x $NPROC rank(s)"

# --------------------------------------------------------------------- what the jobs get (--export=ALL)
PATH="$(dirname "$PYTHON"):$PATH"
export PATH
export TRAINER=${TRAINER:-$PYTHON $ROOT/tests/slurm/fake_trainer.py}
export TORCHRUN GPUS_PER_NODE=0 NPROC_PER_NODE=$NPROC MOCK_DATA=1
export RECIPE=${E2E_RECIPE:-270m}
export SAVE_INTERVAL=${E2E_SAVE_INTERVAL:-10} LOG_INTERVAL=1
export TST_SUPERPOSITION_RATIO=${E2E_TST_RATIO:-0.3}
export EXTRA_ARGS="--distributed-backend gloo ${E2E_EXTRA_ARGS:-}"
export FAKE_TRAINER_ITER_SECONDS=${FAKE_TRAINER_ITER_SECONDS:-0.3}
export OMP_NUM_THREADS=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset MASTER_ADDR MASTER_PORT CONTAINER_IMAGE
say "TRAINER=$TRAINER"

# ------------------------------------------------------------------------ 1. train to completion
if want complete; then
    say "== 1. complete run: $ITERS_COMPLETE iterations"
    t0=$SECONDS
    CKPT1="$WORK/ckpt-complete"
    if start_job "complete run" e2e-complete "$CKPT1" "$ITERS_COMPLETE"; then
        JOB1=$JOB LOG1=$LOG
        wait_until "$JOB_TIMEOUT" "job $JOB1 to finish" job_finished "$JOB1"
        T_JOB1=$((SECONDS - t0))
        state=$(job_field "$JOB1" JobState)
        check "complete run: job $JOB1 state COMPLETED (got ${state:-?}) exit code 0:0 ($(job_field "$JOB1" ExitCode))" \
            test "$state" = COMPLETED -a "$(job_field "$JOB1" ExitCode)" = 0:0
        check "complete run: $NODES node(s) x $NPROC rank(s) = world size $((NODES * NPROC)) in the trainer log" \
            grep -qiE "world[ _]size:? *$((NODES * NPROC))\b" "$LOG1"
        check "complete run: superposition phase logged" grep -qi 'superposition' <(grep -i 'iteration' "$LOG1")
        check "complete run: recovery phase logged" grep -qi 'recovery' <(grep -i 'iteration' "$LOG1")
        check "complete run: checkpoint at iteration $ITERS_COMPLETE (tracker: $(tracker "$CKPT1"))" \
            test "$(tracker "$CKPT1")" = "$ITERS_COMPLETE"
        check "complete run: not requeued (Restarts=$(job_field "$JOB1" Restarts))" test "$(job_field "$JOB1" Restarts)" = 0
        ((FAILS == 0)) || dump_job "$JOB1" "$LOG1"
        say "complete run took ${T_JOB1}s (submit to finish)"
    fi
fi

# ---------------------------------------------------------------- 2. preempt, requeue, resume
if want preempt; then
    say "== 2. preempted run: $ITERS_PREEMPT iterations, SIGUSR1 to the batch shell after iteration $PREEMPT_AFTER_ITER"
    fails_before=$FAILS
    t0=$SECONDS
    CKPT2="$WORK/ckpt-preempt"
    if start_job "preempted run" e2e-preempt "$CKPT2" "$ITERS_PREEMPT"; then
        JOB2=$JOB LOG2=$LOG
        if wait_until "$JOB_TIMEOUT" "job $JOB2 to reach iteration $PREEMPT_AFTER_ITER" \
            job_running_since_iter "$LOG2" "$PREEMPT_AFTER_ITER"; then
            T_SIGNAL=$SECONDS
            say "sending SIGUSR1 to the batch shell of job $JOB2 (scancel --batch --signal=USR1)"
            check "preempt: scancel --batch --signal=USR1 accepted" timeout 10 scancel --batch --signal=USR1 "$JOB2"
            wait_until "$JOB_TIMEOUT" "job $JOB2 to be requeued" job_restarted_or_done "$JOB2"
            T_REQUEUED=$((SECONDS - T_SIGNAL))
            saved_at=$(tracker "$CKPT2")
            say "requeued (or ended) ${T_REQUEUED}s after the signal; checkpoint tracker now at ${saved_at:-none}"
            wait_until "$((JOB_TIMEOUT + 180))" "requeued job $JOB2 to finish" job_finished "$JOB2"
            T_JOB2=$((SECONDS - t0))
            state=$(job_field "$JOB2" JobState)
            restarts=$(job_field "$JOB2" Restarts)
            check "preempt: the batch shell forwarded the signal" grep -q 'batch shell received SIGUSR1' "$LOG2"
            check "preempt: the trainer saved and stopped on the signal, job requeued" \
                grep -q 'trainer saved and stopped on the exit signal (iteration [0-9]*): requeueing' "$LOG2"
            marker_iter=$(grep -oE 'stopped on the exit signal \(iteration [0-9]+\)' "$LOG2" | head -n1 | grep -oE '[0-9]+')
            check "preempt: stopped early, at iteration ${marker_iter:-?} (>= $PREEMPT_AFTER_ITER, < $ITERS_PREEMPT)" \
                test "${marker_iter:-0}" -ge "$PREEMPT_AFTER_ITER" -a "${marker_iter:-0}" -lt "$ITERS_PREEMPT"
            check "preempt: job restarted once (Restarts=$restarts)" test "$restarts" = 1
            check "preempt: the batch script ran a second time (job $JOB2 run 2)" grep -q "job $JOB2 run 2 " "$LOG2"
            check "preempt: run 2 found the checkpoint at iteration ${marker_iter:-?}" \
                grep -q "checkpoint in $CKPT2 at iteration ${marker_iter:-x}: the trainer resumes" "$LOG2"
            first_after=$(awk -v m="${marker_iter:-x}" '
                /checkpoint in .* at iteration / && $0 ~ ("iteration " m ":") {after = 1; next}
                after && match($0, /iteration +[0-9]+\//) {s = substr($0, RSTART, RLENGTH); gsub(/[^0-9]/, "", s); print s; exit}
            ' "$LOG2")
            check "preempt: first iteration after the resume is $((${marker_iter:-0} + 1)) (got ${first_after:-none})" \
                test "${first_after:-x}" = "$((${marker_iter:-0} + 1))"
            check "preempt: job state COMPLETED (got ${state:-?}), exit code $(job_field "$JOB2" ExitCode)" \
                test "$state" = COMPLETED -a "$(job_field "$JOB2" ExitCode)" = 0:0
            check "preempt: checkpoint at iteration $ITERS_PREEMPT after the resume (tracker: $(tracker "$CKPT2"))" \
                test "$(tracker "$CKPT2")" = "$ITERS_PREEMPT"
            check "preempt: marker file removed" test ! -e "$CKPT2/.tst_exit_marker.$JOB2"
            say "preempted run took ${T_JOB2}s (submit to finish, including SLURM's requeue delay)"
        else
            fail "preempt: job $JOB2 never reached iteration $PREEMPT_AFTER_ITER"
        fi
        ((FAILS == fails_before)) || dump_job "$JOB2" "$LOG2"
    fi
fi

# ------------------------------------------------------------------ 3. a plain scancel is final
if want cancel; then
    say "== 3. cancelled run: plain scancel (SIGTERM) after iteration 5 must not requeue"
    fails_before=$FAILS
    t0=$SECONDS
    CKPT3="$WORK/ckpt-cancel"
    if start_job "cancelled run" e2e-cancel "$CKPT3" "$ITERS_PREEMPT"; then
        JOB3=$JOB LOG3=$LOG
        if wait_until "$JOB_TIMEOUT" "job $JOB3 to reach iteration 5" job_running_since_iter "$LOG3" 5; then
            check "cancel: scancel accepted" timeout 10 scancel "$JOB3"
            wait_until 90 "job $JOB3 to finish" job_finished "$JOB3"
            sleep 2
            check "cancel: job state CANCELLED (got $(job_field "$JOB3" JobState))" \
                test "$(job_field "$JOB3" JobState)" = CANCELLED
            check "cancel: not requeued (Restarts=$(job_field "$JOB3" Restarts))" test "$(job_field "$JOB3" Restarts)" = 0
            check "cancel: the launch script refused to requeue" grep -q 'job is ending .*not requeueing' "$LOG3"
        else
            fail "cancel: job $JOB3 never reached iteration 5"
        fi
        ((FAILS == fails_before)) || dump_job "$JOB3" "$LOG3"
        T_JOB3=$((SECONDS - t0))
    fi
fi

# -------------------------------------------- 4. (optional) SLURM's own time-limit warning, requeue loop
if want timelimit; then
    # --time=3 min: SLURM sends SIGUSR1 to the batch shell 120 s (+ up to a minute) before the limit, so each
    # run lasts about a minute; 700 iterations of 0.3 s need three or four requeues. Takes about 6 minutes.
    say "== 4. time limit: --time=3, #SBATCH --signal=B:USR1@120, several requeues until done"
    fails_before=$FAILS
    t0=$SECONDS
    CKPT4="$WORK/ckpt-timelimit"
    ITERS_TL=${E2E_ITERS_TIME_LIMIT:-700}
    # (the job environment is this shell's, --export=ALL: the prefix assignments reach sbatch through start_job)
    if SAVE_INTERVAL=100 LOG_INTERVAL=10 start_job "time-limit run" e2e-timelimit "$CKPT4" "$ITERS_TL" --time=00:03:00; then
        JOB4=$JOB LOG4=$LOG
        wait_until 900 "job $JOB4 to finish" job_finished "$JOB4"
        check "time limit: job state COMPLETED (got $(job_field "$JOB4" JobState))" \
            test "$(job_field "$JOB4" JobState)" = COMPLETED
        check "time limit: requeued on SLURM's warning (Restarts=$(job_field "$JOB4" Restarts))" \
            test "$(job_field "$JOB4" Restarts)" -ge 1
        check "time limit: checkpoint at iteration $ITERS_TL (tracker: $(tracker "$CKPT4"))" \
            test "$(tracker "$CKPT4")" = "$ITERS_TL"
        ((FAILS == fails_before)) || dump_job "$JOB4" "$LOG4"
        T_JOB4=$((SECONDS - t0))
    fi
fi

# ------------------------------------------------------------------------------------------- end
if [[ ${E2E_TEARDOWN:-0} == 1 ]]; then bash "$ROOT/tests/slurm/teardown_local_slurm.sh"; fi
say "timings: setup ${T_SETUP}s, complete run ${T_JOB1:-?}s, preempted run ${T_JOB2:-?}s" \
    "(requeue ${T_REQUEUED:-?}s after the signal), cancelled run ${T_JOB3:--}s, time-limit run ${T_JOB4:--}s," \
    "total $((SECONDS - T_START))s"
if ((FAILS == 0)); then
    echo "PASS: SLURM e2e ($NODES node(s) x $NPROC rank(s), trainer: $TRAINER)"
    exit 0
fi
echo "FAIL: SLURM e2e: $FAILS check(s) failed (logs in $WORK/logs)"
exit 1
