#!/usr/bin/env bash
# Start `trainrun [overrides...]` under nohup, detached from this terminal, so that it
# survives the SSH session closing. Prints the run directory, the pid, and how to follow,
# stop and resume the run.
#
#   scripts/run-nohup.sh trainer.max_steps=20000 scheduler=noam
#
# The run directory is fixed up front (hydra.run.dir) unless you pass one yourself.
set -euo pipefail

source "$(dirname "$0")/run-dir.sh"

nohup $trainrun_cmd "${args[@]}" > "$run_dir/console.out" 2>&1 < /dev/null &
pid=$!

cat <<TXT
run directory: $run_dir
pid:           $pid
follow:        tail -f $run_dir/train.log
stop:          kill -TERM $pid      (finishes the update, writes a checkpoint, exits 143)
resume:        trainrun resume=$run_dir
TXT
