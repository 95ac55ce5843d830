# shellcheck shell=bash
# Shared by slurm/array.sbatch and slurm/multinode.sbatch (sourced, not run).
#
# Inputs (environment): FEDLIT_ROOT (set by the sbatch script), FEDLIT_VENV (default $FEDLIT_ROOT/.venv;
# "none" uses the python already on PATH), FEDLIT_RESUME (default "requeue": add run.resume=auto only when
# Slurm restarted the job; "always": on every start; "never").

fedlit_log() {
    echo "[fedlit-slurm $(date -u +%H:%M:%S)] $*"
}

# cd to the repository, activate its virtual environment, and cap intra-op threads to the job's CPUs.
fedlit_setup() {
    if [[ ! -f "$FEDLIT_ROOT/experiments/train.py" ]]; then
        echo "error: FEDLIT_ROOT=$FEDLIT_ROOT is not the fedlit repository; submit from it or export FEDLIT_ROOT" >&2
        exit 2
    fi
    cd "$FEDLIT_ROOT" || exit 2
    local venv="${FEDLIT_VENV:-$FEDLIT_ROOT/.venv}"
    if [[ "$venv" != none ]]; then
        if [[ ! -f "$venv/bin/activate" ]]; then
            echo "error: no virtual environment at $venv; run 'make setup' or export FEDLIT_VENV (or none)" >&2
            exit 2
        fi
        # shellcheck disable=SC1091
        source "$venv/bin/activate"
    fi
    if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
        export OMP_NUM_THREADS="$SLURM_CPUS_PER_TASK"
    fi
    fedlit_log "job ${SLURM_JOB_ID:-?}${SLURM_ARRAY_TASK_ID:+ (array ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID})}" \
        "on ${SLURM_JOB_NODELIST:-$(hostname)}, restart ${SLURM_RESTART_COUNT:-0}, python $(command -v python)"
}

# Prints "run.resume=auto" when this start should continue the newest run directory of the run's name.
fedlit_resume_override() {
    case "${FEDLIT_RESUME:-requeue}" in
        always) echo "run.resume=auto" ;;
        never) ;;
        requeue) if [[ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]]; then echo "run.resume=auto"; fi ;;
        *) echo "error: FEDLIT_RESUME must be requeue, always or never (got $FEDLIT_RESUME)" >&2; exit 2 ;;
    esac
}

# Runs "$@" in the background and waits for it, forwarding SIGUSR1/SIGTERM to it as SIGUSR1. bash runs a trap
# only between commands, so a foreground child would never hear the warning of --signal=B:USR1@<seconds>; fedlit
# finishes the current round, checkpoints, calls `scontrol requeue` and exits 0. Returns the child's exit code.
fedlit_run_forwarding_signals() {
    local child rc
    "$@" &
    child=$!
    # shellcheck disable=SC2064
    trap "fedlit_log 'stop signal: asking pid $child to checkpoint and requeue'; kill -USR1 $child 2>/dev/null" \
        USR1 TERM
    # A trapped signal interrupts wait (status > 128); wait again until the child is gone. bash keeps the status
    # of a finished background child, so the last wait returns the child's own exit code.
    while wait "$child"; kill -0 "$child" 2>/dev/null; do :; done
    wait "$child"
    rc=$?
    trap - USR1 TERM
    fedlit_log "exit code $rc"
    return "$rc"
}
