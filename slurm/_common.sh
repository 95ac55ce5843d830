# shellcheck shell=bash
# Shared by slurm/array.sbatch and slurm/multinode.sbatch (sourced, not run).
#
# Inputs (environment): FEDLIT_ROOT (set by the sbatch script: a fedlit checkout, or any directory when fedlit is
# pip-installed), FEDLIT_PYTHON (an interpreter with fedlit installed; `fedlit slurm` sets it to its own),
# FEDLIT_VENV (default $FEDLIT_ROOT/.venv in a checkout, none otherwise; "none" uses what is on PATH),
# FEDLIT_RESUME (default "requeue": add run.resume=auto only when Slurm restarted the job; "always": on every
# start; "never").

fedlit_log() {
    echo "[fedlit-slurm $(date -u +%H:%M:%S)] $*"
}

# Whether $FEDLIT_ROOT is a fedlit source checkout (then the job runs there, with its own package first).
fedlit_is_checkout() {
    [[ -f "$FEDLIT_ROOT/experiments/train.py" && -d "$FEDLIT_ROOT/fedlit" ]]
}

# cd to the checkout (or stay in $FEDLIT_ROOT without one), activate a virtual environment when there is one, set
# FEDLIT_CMD to the fedlit command, and cap intra-op threads to the job's CPUs. FEDLIT_CMD: "$FEDLIT_PYTHON -m
# fedlit" when FEDLIT_PYTHON is set; "python -m fedlit" in a checkout (its package first on sys.path); else the
# `fedlit` on PATH (a pip-installed package, no checkout needed).
fedlit_setup() {
    local default_venv=none
    if fedlit_is_checkout; then
        default_venv="$FEDLIT_ROOT/.venv"
    fi
    cd "$FEDLIT_ROOT" || { echo "error: cannot enter FEDLIT_ROOT=$FEDLIT_ROOT" >&2; exit 2; }
    local venv="${FEDLIT_VENV:-$default_venv}"
    if [[ -n "${FEDLIT_PYTHON:-}" ]]; then
        venv=none
    fi
    if [[ "$venv" != none ]]; then
        if [[ ! -f "$venv/bin/activate" ]]; then
            echo "error: no virtual environment at $venv; run 'make setup' or export FEDLIT_VENV (or none)" >&2
            exit 2
        fi
        # shellcheck disable=SC1091
        source "$venv/bin/activate"
    fi
    if [[ -n "${FEDLIT_PYTHON:-}" ]]; then
        FEDLIT_CMD=("$FEDLIT_PYTHON" -m fedlit)
    elif fedlit_is_checkout; then
        FEDLIT_CMD=(python -m fedlit)
    elif command -v fedlit >/dev/null; then
        FEDLIT_CMD=(fedlit)
    else
        echo "error: no fedlit command on PATH; pip install fedlit, export FEDLIT_VENV or FEDLIT_PYTHON, or submit" \
            "from a fedlit checkout" >&2
        exit 2
    fi
    if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
        export OMP_NUM_THREADS="$SLURM_CPUS_PER_TASK"
    fi
    fedlit_log "job ${SLURM_JOB_ID:-?}${SLURM_ARRAY_TASK_ID:+ (array ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID})}" \
        "on ${SLURM_JOB_NODELIST:-$(hostname)}, restart ${SLURM_RESTART_COUNT:-0}, in $PWD, ${FEDLIT_CMD[*]}"
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
