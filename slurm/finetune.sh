#!/bin/bash
# Finetuning (sparse memory by default; baselines with OVERRIDES="method=full" or "method=lora").
# Submit from the repo root: sbatch slurm/finetune.sh   (docs/slurm.md: overrides, preemption)
#SBATCH --job-name=smft-finetune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=USR1@120
CONFIG=${CONFIG:-configs/paper/finetune_triviaqa_sparse_1p3b.yaml}
# sbatch runs a copy of this file from its spool folder: find the repo from the submit folder.
SMFT_REPO=${SMFT_REPO:-$SLURM_SUBMIT_DIR}
source "$SMFT_REPO/slurm/_launch.sh" || { echo "submit from the repo root or set SMFT_REPO" >&2; exit 2; }
