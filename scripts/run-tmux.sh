#!/usr/bin/env bash
# Start `trainrun [overrides...]` in a detached tmux session, so that it survives the SSH
# session closing and you can re-attach to its progress bar. Prints the run directory, the
# session name, and how to attach, follow, stop and resume the run.
#
#   scripts/run-tmux.sh trainer.max_steps=20000 scheduler=noam
#
# TRAINRUN_SESSION names the session (default: trainrun-<date>-<time>).
set -euo pipefail

source "$(dirname "$0")/run-dir.sh"
session="${TRAINRUN_SESSION:-trainrun-${stamp//\//-}}"

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
