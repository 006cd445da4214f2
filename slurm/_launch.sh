# Shared body of slurm/{pretrain,finetune,background_index}.sh, sourced by them after they set
# CONFIG. Runs in the batch shell on the first node; starts one launcher per node with
# srun, rendezvous on the first host of the allocation, and requeues the job when the training
# processes stopped for preemption (exit code 75). See docs/slurm.md.
#
# Environment overrides (all optional):
#   CONFIG         YAML passed as --config (each job script sets a default)
#   OVERRIDES      extra key=value arguments, space separated: "steps=100 optim.lr=2"
#   NNODES         nodes to launch on (default: all of the allocation, $SLURM_JOB_NUM_NODES)
#   GPUS_PER_NODE  processes per node (default: $SLURM_GPUS_ON_NODE, else 1)
#   LAUNCHER       torchrun (default) | deepspeed
#   PYTHON         interpreter (default: <repo>/.venv/bin/python if present, else python3)
#   ENTRY          training script (default: launchers/train.py)
#   MASTER_PORT    rendezvous port on the first node (default: 20000 + job id % 20000)
set -euo pipefail
cd "$SMFT_REPO"

PREEMPTED=75  # the trainer's exit code after a signal-triggered checkpoint (EX_TEMPFAIL)
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=$SMFT_REPO/.venv/bin/python; else PYTHON=python3; fi
fi
LAUNCHER=${LAUNCHER:-torchrun}
ENTRY=${ENTRY:-launchers/train.py}
OVERRIDES=${OVERRIDES:-}
NNODES=${NNODES:-$SLURM_JOB_NUM_NODES}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
# The launcher sets each rank's own; left over from the shell that ran sbatch (which exports its
# environment), they would override what it leaves unset (DeepSpeed sets no LOCAL_WORLD_SIZE).
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE LOCAL_SIZE GROUP_RANK ROLE_RANK
HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n "$NNODES" | paste -sd,)
MASTER_ADDR=${HOSTS%%,*}
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

fail() { echo "slurm/_launch.sh: $*" >&2; exit 2; }
[ -f "$CONFIG" ] || fail "CONFIG=$CONFIG does not exist (relative to $SMFT_REPO); set CONFIG=path/to.yaml"
[ -f "$ENTRY" ] || fail "ENTRY=$ENTRY does not exist (relative to $SMFT_REPO)"
case $LAUNCHER in torchrun | deepspeed) ;; *) fail "LAUNCHER=$LAUNCHER: use torchrun or deepspeed" ;; esac
[ "$NNODES" -le "$SLURM_JOB_NUM_NODES" ] ||
  fail "NNODES=$NNODES but the job has $SLURM_JOB_NUM_NODES nodes: sbatch --nodes=$NNODES ..."

# `wait PID`, resumed when a trapped signal cuts it short; returns PID's exit code.
wait_through_traps() {
  local rc
  wait "$1" && rc=0 || rc=$?
  while [ "$rc" -gt 128 ] && kill -0 "$1" 2> /dev/null; do wait "$1" && rc=0 || rc=$?; done
  return "$rc"
}

# One launcher per node (an srun task). The launcher starts with SIGUSR1 and SIGTERM ignored so
# that only the training ranks act on them (torchrun would die on SIGUSR1 and orphan the ranks,
# and on SIGTERM kill them 30 s later): Slurm signals every process of the step, ranks included.
# torchrun reports exit code 1 whatever its ranks returned, so a node that saw a stop signal and
# whose launcher then failed reports 75 itself. A node whose launcher failed without a stop signal
# (a rank crashed, or timed out waiting for a dead or frozen peer) kills the step on every node:
# srun would otherwise wait for the other nodes' ranks, which a frozen rank never lets finish.
smft_node() {
  local launcher args extra rc stopped=0 hostfile=${TMPDIR:-/tmp}/smft-hostfile-$SLURM_JOB_ID-$SLURM_NODEID
  case $LAUNCHER in
    torchrun)
      # torchrun installs handlers for these over the inherited "ignore"; SIGTERM is left out
      # (PET_: torchrun's --signals-to-handle flag as env, TORCHELASTIC_: older torch).
      export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT TORCHELASTIC_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT
      launcher=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE"
                --node_rank "$SLURM_NODEID" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT") ;;
    deepspeed)
      # Each node writes its own hostfile (node-local /tmp); --no_ssh: Slurm, not pdsh, started
      # this launcher on every node, and it starts only its own node's ranks.
      tr , '\n' <<< "$HOSTS" | sed "s/\$/ slots=$GPUS_PER_NODE/" > "$hostfile"
      launcher=("$PYTHON" -m deepspeed.launcher.runner --hostfile "$hostfile" --no_ssh
                --node_rank "$SLURM_NODEID" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
                --no_local_rank) ;;
  esac
  read -ra extra <<< "$OVERRIDES"
  args=(--config "$CONFIG" "${extra[@]}")
  echo "node $SLURM_NODEID/$NNODES ($(hostname)): ranks $((SLURM_NODEID * GPUS_PER_NODE))-$(((SLURM_NODEID + 1) * GPUS_PER_NODE - 1)) of $((NNODES * GPUS_PER_NODE)): ${launcher[*]} $ENTRY ${args[*]}"
  trap '' USR1 TERM  # inherited by the launcher (an ignored signal stays ignored across exec)
  "${launcher[@]}" "$ENTRY" "${args[@]}" &
  trap 'stopped=1' USR1 TERM
  wait_through_traps $! && rc=0 || rc=$?
  rm -f "$hostfile"
  if [ "$rc" -ne 0 ] && [ "$stopped" = 1 ]; then
    rc=$PREEMPTED
  elif [ "$rc" -ne 0 ]; then
    echo "node $SLURM_NODEID ($(hostname)): launcher failed (exit $rc): killing step $SLURM_JOB_ID.$SLURM_STEP_ID on every node" >&2
    scancel --signal=KILL "$SLURM_JOB_ID.$SLURM_STEP_ID" || true
  fi
  return "$rc"
}
export -f smft_node wait_through_traps
export CONFIG OVERRIDES NNODES GPUS_PER_NODE LAUNCHER PYTHON ENTRY HOSTS MASTER_ADDR MASTER_PORT PREEMPTED

echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NNODES node(s) x $GPUS_PER_NODE, $LAUNCHER, master $MASTER_ADDR:$MASTER_PORT"
# A signal sent to the batch shell only (--signal=B:USR1@N, scancel --batch) is passed on to
# every process of the steps; SIGTERM (scancel, preemption) must not end the batch shell before
# the ranks have saved.
trap 'scancel --signal=USR1 "$SLURM_JOB_ID"' USR1
trap 'echo "job $SLURM_JOB_ID: SIGTERM, waiting for the ranks to save"' TERM
srun --nodelist="$HOSTS" --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --export=ALL \
  ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} bash -c smft_node &
wait_through_traps $! && rc=0 || rc=$?
# Requeue only a job that Slurm is not ending itself: after scancel, a time limit or Slurm's own
# preemption (which requeues --requeue jobs by itself) the state is no longer RUNNING.
state=$(scontrol show job -o "$SLURM_JOB_ID" | grep -o 'JobState=[A-Z_]*' || true)
if [ "$rc" -eq "$PREEMPTED" ] && [ "$state" = JobState=RUNNING ]; then
  echo "job $SLURM_JOB_ID: training saved a checkpoint and stopped (exit $rc): requeueing"
  scontrol requeue "$SLURM_JOB_ID"
elif [ "$rc" -eq "$PREEMPTED" ]; then
  echo "job $SLURM_JOB_ID: training saved a checkpoint and stopped; $state: not requeueing"
fi
exit "$rc"
