# Sourced by run-nohup.sh and run-tmux.sh: fixes the run directory up front.
# In: the trainrun overrides as "$@". Out: stamp (<date>/<time>), run_dir (from
# hydra.run.dir=... if given, else outputs/<stamp>, created), args (the overrides, with
# hydra.run.dir added when it was not given), trainrun_cmd ($TRAINRUN or trainrun).
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
trainrun_cmd=${TRAINRUN:-trainrun}
