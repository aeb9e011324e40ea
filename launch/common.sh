# shellcheck shell=bash
# launch/common.sh: shared by launch/train_dense.sbatch, launch/train_moe.sbatch and launch/train_local.sh
# (sourced, not run). It holds the environment defaults, the trainer argument groups and the launchers; the
# model itself lives in the trainer (`--recipe NAME` + overrides), never here.
#
# ------------------------------------------------------------------------------------- configuration
# Every knob is an environment variable with a default; an empty value means "leave it to the recipe"
# (the flag is not passed at all). sbatch exports the submitting shell's environment (--export=ALL),
# so `VAR=value sbatch launch/train_dense.sbatch` works, and so does the requeued run.
#
#   TRAINER          command that trains, split on whitespace  [python -m megatron_tst.pretrain]
#   TORCHRUN         torchrun executable                       [torchrun]
#   RECIPE           --recipe: 270m | 600m | 3b | 10b-a1b      [set by each launch script]
#   DATA_PATH        --data-path (Megatron blend: "[W1] PREFIX1 [W2] PREFIX2 ..."); required unless MOCK_DATA=1
#   MOCK_DATA=1      --mock-data instead of DATA_PATH (smoke tests)
#   TOKENIZER_MODEL  --tokenizer-model (with --tokenizer-type $TOKENIZER_TYPE [HuggingFaceTokenizer]) if set
#   CKPT_DIR         --save and --load (same dir: automatic resume)  [$PWD/checkpoints/$RECIPE]
#   SAVE_INTERVAL    --save-interval                           [1000]
#   TP PP EP CP      tensor / pipeline / expert / context parallel sizes (flag passed only when set; every
#                    recipe turns on sequence parallelism, which applies when TP > 1)
#   MICRO_BATCH_SIZE GLOBAL_BATCH_SIZE TRAIN_ITERS SEQ_LENGTH LR   overrides of the recipe (only when set)
#   TST_BAG_SIZE TST_SUPERPOSITION_RATIO   --tst-bag-size / --tst-superposition-ratio (only when set)
#   LOG_INTERVAL [10]  TENSORBOARD_DIR [$CKPT_DIR/tensorboard]  WANDB_PROJECT WANDB_EXP_NAME (when set)
#   EXTRA_ARGS       more trainer flags, split on whitespace (e.g. "--distributed-backend gloo"); the launch
#                    script's own arguments are appended after them, so `sbatch train_dense.sbatch --lr 1e-4`
#   GPUS_PER_NODE    GPUs per node [SLURM_GPUS_PER_NODE under sbatch, else the GPUs nvidia-smi sees]; 0 = CPU:
#                    no --gpus-per-node is passed to srun and NPROC_PER_NODE ranks run on CPU
#   NPROC_PER_NODE   ranks per node                           [GPUS_PER_NODE, or 1 when GPUS_PER_NODE=0]
#   MASTER_ADDR MASTER_PORT   c10d rendezvous endpoint [first node of the job, 20000 + SLURM_JOB_ID % 20000]
#   CONTAINER_IMAGE  if set (pyxis/enroot): srun --container-image=$CONTAINER_IMAGE
#                    --container-mounts=$CONTAINER_MOUNTS [$PWD:$PWD] --container-workdir=$PWD; mount the
#                    data, CKPT_DIR and the repo at the same paths inside (the batch shell, outside the
#                    container, reads CKPT_DIR/latest_checkpointed_iteration.txt and the exit marker)
#   SRUN_EXTRA_ARGS  more srun flags, split on whitespace
#   MAX_REQUEUES     stop requeueing after this many restarts  [50]
#   TST_DRY_RUN=1    print the srun/torchrun command line instead of running it (works outside a job too)
#
# --------------------------------------------------------------------------- preemption contract
# (sbatch script <-> trainer; train_local.sh does not requeue)
#   1. SLURM sends SIGUSR1 to the batch shell 120 s before the time limit (#SBATCH --signal=B:USR1@120);
#      an operator can do the same at any time: `scancel --batch --signal=USR1 JOBID` (save + requeue).
#      SIGTERM to the batch shell is forwarded the same way (save), but see 4: a cancelled job stays cancelled.
#   2. The batch shell forwards SIGUSR1 to the srun step (srun relays it to every task). On each node the
#      task is `torchrun`, started with SIGUSR1 *ignored* so that the agent survives it (torchrun has no
#      SIGUSR1 handler; the default action would kill it and then its ranks). The ranks inherit the ignored
#      disposition until Megatron-LM's signal handler takes SIGUSR1 over (--exit-signal-handler --exit-signal
#      SIGUSR1, passed by CHECKPOINT_ARGS below).
#   3. The trainer (Megatron-LM's loop) on that signal: after the current step all ranks agree (its handler
#      all-gathers the "signal received" flags), save a checkpoint to --save (<save>/latest_checkpointed_
#      iteration.txt names the iteration) and exit with status 0; before exiting, global rank 0 writes the
#      iteration into the marker file named by the environment variable TST_EXIT_MARKER (megatron_tst.pretrain).
#      A plain `scancel` sends SIGTERM to every process of the job: torchrun relays it to the ranks and kills them
#      after its grace period (30 s); TST_EXIT_SIGNALS=SIGTERM makes them save on it too (the same flag).
#   4. When the step has ended, the batch shell requeues the job (`scontrol requeue $SLURM_JOB_ID`) if and
#      only if the marker exists, the job is still RUNNING for slurmctld (not COMPLETING: a plain `scancel`
#      sends SIGTERM, the trainer saves, and the job ends; the same if the time limit struck during the save,
#      so keep the --signal lead time above the save time) and SLURM_RESTART_COUNT < MAX_REQUEUES; otherwise
#      it exits with the step's status. The requeued run gets the same job id and environment, and resumes
#      through --load (same directory as --save). The trainer's exit status does not decide the requeue
#      (torchrun itself exits 1 when it got SIGTERM, even if every rank exited 0).
#   TST_EXIT_MARKER is $CKPT_DIR/.tst_exit_marker.$SLURM_JOB_ID: on the checkpoint file system, because rank 0
#   may run on any node. The batch shell deletes it before each run and after reading it.

# Bash arrays filled by tst_build_args.
MODEL_ARGS=() PARALLEL_ARGS=() TRAINING_ARGS=() TST_ARGS=() DATA_ARGS=() CHECKPOINT_ARGS=() LOGGING_ARGS=()
TRAINER_CMD=() TRAINER_ARGS=() SCRIPT_ARGS=()

tst_log() { printf '[tst-launch %(%F %T)T] %s\n' -1 "$*"; }
tst_die() { printf '[tst-launch] ERROR: %s\n' "$*" >&2; exit 2; }

# _tst_opt ARRAY FLAG VALUE: append "FLAG VALUE" to ARRAY when VALUE is not empty
_tst_opt() {
    local -n _tst_arr=$1
    if [[ -n ${3:-} ]]; then _tst_arr+=("$2" "$3"); fi
}

tst_count_gpus() {   # GPUs visible on this node (0 without nvidia-smi)
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

tst_defaults() {
    : "${TRAINER:=python -m megatron_tst.pretrain}"
    : "${TORCHRUN:=torchrun}"
    : "${RECIPE:?RECIPE must be set (270m | 600m | 3b | 10b-a1b)}"
    : "${CKPT_DIR:=$PWD/checkpoints/$RECIPE}"
    : "${SAVE_INTERVAL:=1000}"
    : "${LOG_INTERVAL:=10}"
    : "${TENSORBOARD_DIR:=$CKPT_DIR/tensorboard}"
    : "${TOKENIZER_TYPE:=HuggingFaceTokenizer}"
    : "${MAX_REQUEUES:=50}"
    if [[ -z ${GPUS_PER_NODE:-} ]]; then
        if [[ -n ${SLURM_GPUS_PER_NODE:-} ]]; then
            GPUS_PER_NODE=${SLURM_GPUS_PER_NODE##*:}   # "8" or "h100:8"
        else
            GPUS_PER_NODE=$(tst_count_gpus)
        fi
    fi
    [[ $GPUS_PER_NODE =~ ^[0-9]+$ ]] || tst_die "GPUS_PER_NODE must be a number, got '$GPUS_PER_NODE'"
    if [[ -z ${NPROC_PER_NODE:-} ]]; then
        if ((GPUS_PER_NODE > 0)); then NPROC_PER_NODE=$GPUS_PER_NODE; else NPROC_PER_NODE=1; fi
    fi
    export TRAINER TORCHRUN RECIPE CKPT_DIR GPUS_PER_NODE NPROC_PER_NODE
}

# tst_build_args [ARG...]: fill the argument groups from the environment and keep ARG... (the launch script's
# arguments) for the end of the command line. A launch script may extend the groups afterwards.
tst_build_args() {
    tst_defaults
    read -r -a TRAINER_CMD <<<"$TRAINER"
    ((${#TRAINER_CMD[@]} > 0)) || tst_die "TRAINER is empty"

    # model: a named recipe; the architecture lives in the trainer
    MODEL_ARGS=(--recipe "$RECIPE")
    _tst_opt MODEL_ARGS --seq-length "${SEQ_LENGTH:-}"

    PARALLEL_ARGS=()
    _tst_opt PARALLEL_ARGS --tensor-model-parallel-size "${TP:-}"
    _tst_opt PARALLEL_ARGS --pipeline-model-parallel-size "${PP:-}"
    _tst_opt PARALLEL_ARGS --expert-model-parallel-size "${EP:-}"
    _tst_opt PARALLEL_ARGS --context-parallel-size "${CP:-}"

    TRAINING_ARGS=()
    _tst_opt TRAINING_ARGS --micro-batch-size "${MICRO_BATCH_SIZE:-}"
    _tst_opt TRAINING_ARGS --global-batch-size "${GLOBAL_BATCH_SIZE:-}"
    _tst_opt TRAINING_ARGS --train-iters "${TRAIN_ITERS:-}"
    _tst_opt TRAINING_ARGS --lr "${LR:-}"

    TST_ARGS=()
    _tst_opt TST_ARGS --tst-bag-size "${TST_BAG_SIZE:-}"
    _tst_opt TST_ARGS --tst-superposition-ratio "${TST_SUPERPOSITION_RATIO:-}"

    DATA_ARGS=()
    if [[ ${MOCK_DATA:-0} == 1 ]]; then
        DATA_ARGS+=(--mock-data)
    elif [[ -n ${DATA_PATH:-} ]]; then
        local data_path=()
        read -r -a data_path <<<"$DATA_PATH"
        DATA_ARGS+=(--data-path "${data_path[@]}")
    else
        tst_die "set DATA_PATH (Megatron --data-path blend) or MOCK_DATA=1"
    fi
    if [[ -n ${TOKENIZER_MODEL:-} ]]; then
        DATA_ARGS+=(--tokenizer-type "$TOKENIZER_TYPE" --tokenizer-model "$TOKENIZER_MODEL")
    fi

    # --save and --load on the same directory: a (re)started job resumes from the latest checkpoint; SIGUSR1 is
    # the preemption warning (see the contract above)
    CHECKPOINT_ARGS=(--save "$CKPT_DIR" --load "$CKPT_DIR" --save-interval "$SAVE_INTERVAL" --exit-signal-handler
        --exit-signal SIGUSR1)

    LOGGING_ARGS=(--log-interval "$LOG_INTERVAL" --tensorboard-dir "$TENSORBOARD_DIR")
    _tst_opt LOGGING_ARGS --wandb-project "${WANDB_PROJECT:-}"
    _tst_opt LOGGING_ARGS --wandb-exp-name "${WANDB_EXP_NAME:-}"

    SCRIPT_ARGS=("$@")
}

# _tst_assemble: TRAINER_ARGS = the groups (as the launch script may have extended them), EXTRA_ARGS, then
# the launch script's own arguments: later flags win in Megatron's argparse, so both override the groups.
_tst_assemble() {
    local extra=()
    read -r -a extra <<<"${EXTRA_ARGS:-}"
    TRAINER_ARGS=(
        "${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${TST_ARGS[@]}"
        "${DATA_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" "${LOGGING_ARGS[@]}" "${extra[@]}" "${SCRIPT_ARGS[@]}"
    )
}

tst_env_setup() {
    export CUDA_DEVICE_MAX_CONNECTIONS=1   # Megatron: TP/SP communication overlaps compute in issue order
    export PYTHONUNBUFFERED=1
    if [[ -z ${OMP_NUM_THREADS:-} ]]; then
        local cpus=${SLURM_CPUS_ON_NODE:-$(nproc)}
        OMP_NUM_THREADS=$((cpus / NPROC_PER_NODE))
        ((OMP_NUM_THREADS >= 1)) || OMP_NUM_THREADS=1
        export OMP_NUM_THREADS
    fi
    # export TORCH_NCCL_AVOID_RECORD_STREAMS=1
    # export NCCL_DEBUG=WARN                    # INFO to debug hangs / topology
    # export NCCL_SOCKET_IFNAME=ib0              # or the cluster's data-network interface
    # export NCCL_IB_HCA=mlx5                    # InfiniBand HCAs to use
    # export NCCL_IB_TIMEOUT=22
    # export NCCL_NVLS_ENABLE=0                  # if NVLink SHARP misbehaves
    # export NCCL_ASYNC_ERROR_HANDLING=1
    if [[ ${TST_DRY_RUN:-0} != 1 ]]; then mkdir -p "$CKPT_DIR"; fi
}

tst_print_config() {
    tst_log "trainer: ${TRAINER_CMD[*]}"
    tst_log "MODEL_ARGS:      ${MODEL_ARGS[*]}"
    tst_log "PARALLEL_ARGS:   ${PARALLEL_ARGS[*]}"
    tst_log "TRAINING_ARGS:   ${TRAINING_ARGS[*]}"
    tst_log "TST_ARGS:        ${TST_ARGS[*]}"
    tst_log "DATA_ARGS:       ${DATA_ARGS[*]}"
    tst_log "CHECKPOINT_ARGS: ${CHECKPOINT_ARGS[*]}"
    tst_log "LOGGING_ARGS:    ${LOGGING_ARGS[*]}"
    tst_log "all trainer args: ${TRAINER_ARGS[*]}"
    local tracker="$CKPT_DIR/latest_checkpointed_iteration.txt"
    if [[ -s $tracker ]]; then
        tst_log "checkpoint in $CKPT_DIR at iteration $(<"$tracker"): the trainer resumes from it"
    else
        tst_log "no checkpoint in $CKPT_DIR: the trainer starts from scratch"
    fi
}

# ------------------------------------------------------------------------------------ one machine
tst_local_run() {
    tst_env_setup
    # no batch shell here: torchrun relays SIGTERM (Ctrl-C: SIGINT) to the ranks, so that is the exit signal
    CHECKPOINT_ARGS=("${CHECKPOINT_ARGS[@]/#SIGUSR1/SIGTERM}")
    _tst_assemble
    tst_print_config
    tst_log "torchrun --standalone: $NPROC_PER_NODE process(es)"
    local cmd=("$TORCHRUN" --standalone --nnodes 1 --nproc-per-node "$NPROC_PER_NODE" --no-python
        "${TRAINER_CMD[@]}" "${TRAINER_ARGS[@]}")
    if [[ ${TST_DRY_RUN:-0} == 1 ]]; then
        tst_log "TST_DRY_RUN=1, would run: ${cmd[*]@Q}"
        return 0
    fi
    exec "${cmd[@]}"
}

# ------------------------------------------------------------------------------------------ SLURM
_TST_STEP_PID="" _TST_SIGNALLED=""

_tst_on_signal() {   # trap handler in the batch shell: forward SIGUSR1 to the training step
    _TST_SIGNALLED=$1
    tst_log "batch shell received SIG$1: forwarding SIGUSR1 to the training step (save, then requeue)"
    if [[ -n $_TST_STEP_PID ]]; then
        kill -USR1 "$_TST_STEP_PID" 2>/dev/null || true
    fi
}

tst_slurm_run() {
    if [[ ${TST_DRY_RUN:-0} == 1 && -z ${SLURM_JOB_ID:-} ]]; then   # show the command outside a job
        SLURM_JOB_ID=0 SLURM_NNODES=${SLURM_NNODES:-2} SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST:-node1}
        MASTER_ADDR=${MASTER_ADDR:-node1}
    fi
    [[ -n ${SLURM_JOB_ID:-} ]] || tst_die "not inside a SLURM job: submit with sbatch (or use launch/train_local.sh)"
    tst_env_setup
    _tst_assemble
    local nnodes=${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}
    : "${MASTER_ADDR:=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}"
    : "${MASTER_PORT:=$((20000 + SLURM_JOB_ID % 20000))}"
    export MASTER_ADDR MASTER_PORT
    export TST_EXIT_MARKER="$CKPT_DIR/.tst_exit_marker.$SLURM_JOB_ID"
    rm -f "$TST_EXIT_MARKER"
    # a cancelled job's SIGTERM reaches the ranks through torchrun: save on it too (megatron_tst/platform)
    export TST_EXIT_SIGNALS=SIGTERM

    local srun_args=(--nodes="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1)
    if ((GPUS_PER_NODE > 0)); then srun_args+=(--gpus-per-node="$GPUS_PER_NODE"); fi
    if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
    if [[ -n ${CONTAINER_IMAGE:-} ]]; then
        srun_args+=(--container-image="$CONTAINER_IMAGE" --container-mounts="${CONTAINER_MOUNTS:-$PWD:$PWD}"
            --container-workdir="$PWD")
    fi
    local srun_extra=()
    read -r -a srun_extra <<<"${SRUN_EXTRA_ARGS:-}"
    srun_args+=("${srun_extra[@]}")

    local torchrun_args=(--nnodes "$nnodes" --nproc-per-node "$NPROC_PER_NODE"
        --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$SLURM_JOB_ID"
        --max-restarts 0 --no-python)

    tst_print_config
    tst_log "job $SLURM_JOB_ID run $((${SLURM_RESTART_COUNT:-0} + 1)) (SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0})" \
        "on $nnodes node(s) [$SLURM_JOB_NODELIST] x $NPROC_PER_NODE rank(s), GPUS_PER_NODE=$GPUS_PER_NODE," \
        "rendezvous $MASTER_ADDR:$MASTER_PORT"

    if [[ ${TST_DRY_RUN:-0} == 1 ]]; then
        # shellcheck disable=SC2016
        tst_log "TST_DRY_RUN=1, would run: srun ${srun_args[*]@Q} bash -c 'trap \"\" USR1; exec \"\$@\"' tst-node" \
            "${TORCHRUN@Q} ${torchrun_args[*]@Q} ${TRAINER_CMD[*]@Q} ${TRAINER_ARGS[*]@Q}"
        return 0
    fi
    trap '_tst_on_signal USR1' USR1
    trap '_tst_on_signal TERM' TERM
    # `trap "" USR1` before exec: torchrun (and, by inheritance, the ranks until they install their handler)
    # ignore SIGUSR1; see the preemption contract above.
    # shellcheck disable=SC2016  # $@ is expanded by the inner bash
    srun "${srun_args[@]}" bash -c 'trap "" USR1; exec "$@"' tst-node \
        "$TORCHRUN" "${torchrun_args[@]}" "${TRAINER_CMD[@]}" "${TRAINER_ARGS[@]}" &
    _TST_STEP_PID=$!
    if [[ -n $_TST_SIGNALLED ]]; then _tst_on_signal "$_TST_SIGNALLED"; fi   # arrived before srun started

    # `wait` returns early whenever a trapped signal arrives: wait until srun is really gone
    while kill -0 "$_TST_STEP_PID" 2>/dev/null; do wait "$_TST_STEP_PID" || true; done
    local rc=0
    wait "$_TST_STEP_PID" || rc=$?
    _TST_STEP_PID=""
    trap '' USR1 TERM   # from here on (requeue sends SIGTERM to this shell) finish the bookkeeping undisturbed
    tst_log "training step exited with status $rc${_TST_SIGNALLED:+ (after SIG$_TST_SIGNALLED)}"

    if [[ -f $TST_EXIT_MARKER ]]; then
        local at state="" try
        at=$(head -c 64 "$TST_EXIT_MARKER" | tr -d '\n')
        rm -f "$TST_EXIT_MARKER"
        for try in 1 2 3; do
            # `|| state=""`: under set -e a failed scontrol (slurmctld busy) would end the script, not retry
            state=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p') \
                || state=""
            if [[ -n $state ]]; then break; fi
            if ((try < 3)); then sleep "$try"; fi
        done
        if [[ $state != RUNNING ]]; then
            # A plain `scancel` (SIGTERM) also makes the trainer save, and SLURM would still accept a requeue
            # while the job is COMPLETING: refuse, cancelling must stop the job for good. (The same holds when
            # the time limit struck during the save: make the --signal lead time longer than a save.)
            tst_log "trainer saved on the exit signal (iteration ${at:-?}) but the job is ending (JobState=${state:-?}," \
                "cancelled or out of time): not requeueing; resubmit with the same CKPT_DIR to resume"
            exit "$rc"
        fi
        if ((${SLURM_RESTART_COUNT:-0} >= MAX_REQUEUES)); then
            tst_log "trainer stopped on the exit signal (iteration ${at:-?}) but MAX_REQUEUES=$MAX_REQUEUES reached: not requeueing"
            exit 1
        fi
        tst_log "trainer saved and stopped on the exit signal (iteration ${at:-?}): requeueing job $SLURM_JOB_ID"
        if scontrol requeue "$SLURM_JOB_ID"; then
            exit 0
        fi
        tst_log "scontrol requeue failed (job cancelled, or not requeueable?)"
        exit 1
    fi
    exit "$rc"
}
