#!/usr/bin/env bash
# Start `trainrun [overrides...]` in a detached tmux session, so that it survives the SSH
# session closing and you can re-attach to its progress bar. Prints the run directory, the
# session name, and how to attach, follow, stop and resume the run.
#
#   scripts/run-tmux.sh trainer.max_steps=20000 scheduler=noam
#
# TRAINRUN_SESSION names the session (default: trainrun-<date>-<time>).
set -euo pipefail

stamp="$(date +%Y-%m-%d)/$(date +%H-%M-%S)"
run_dir=""
for arg in "$@"; do
  case "$arg" in hydra.run.dir=*) run_dir="${arg#hydra.run.dir=}" ;; esac
done
args=("$@")
if [ -z "$run_dir" ]; then
  run_dir="outputs/$stamp"
  args+=("hydra.run.dir=$run_dir")
fi
mkdir -p "$run_dir"
session="${TRAINRUN_SESSION:-trainrun-${stamp//\//-}}"
trainrun_cmd=${TRAINRUN:-trainrun}

command="$trainrun_cmd $(printf '%q ' "${args[@]}"); echo \"trainrun exited with status \$?\"; exec \$SHELL"
tmux new-session -d -s "$session" -c "$PWD" "$command"

cat <<TXT
run directory: $run_dir
tmux session:  $session
attach:        tmux attach -t $session      (detach again with Ctrl-b d)
follow:        tail -f $run_dir/train.log
stop:          tmux send-keys -t $session C-c      (checkpoint, then exit 130)
resume:        trainrun resume=$run_dir
TXT
