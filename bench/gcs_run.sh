#!/usr/bin/env bash
# A run whose workdir is a gs:// bucket, against a local GCS API server (tests/gcs.py):
# train 20 steps, SIGTERM, resume to 40, heft eval, heft verify. Prints the transcript.
#
#     bash bench/gcs_run.sh        (needs pip install -e ".[test]" for the server)
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu
env_file=$(mktemp)
python tests/gcs.py > "$env_file" &
server=$!
trap 'kill $server 2>/dev/null; rm -f "$env_file"' EXIT
until grep -q bucket "$env_file" 2>/dev/null; do sleep 0.2; done
# shellcheck disable=SC1090
source <(grep '^export' "$env_file")
bucket=$(sed -n 's/^# bucket: \(gs:\/\/[^;]*\);.*/\1/p' "$env_file")
run="$bucket/run-$(date +%s)"
args=(--config=configs/tiny.py --config.train.steps=40 --config.train.warmup_steps=10 --config.train.log_every=5
      --config.train.eval_every=20 --config.train.checkpoint_every=20)

echo "\$ heft train --workdir=$run ${args[*]}   # SIGTERM once step 20 is logged"
log=$(mktemp)
heft train --workdir="$run" "${args[@]}" > "$log" 2>&1 &
pid=$!
until grep -q "^step 20:" "$log"; do
  kill -0 $pid 2>/dev/null || { cat "$log"; exit 1; }
  sleep 0.2
done
kill -TERM $pid
wait $pid && echo "(exit 0)"
cat "$log"
echo
echo "\$ heft train --workdir=$run ${args[*]}"
heft train --workdir="$run" "${args[@]}" && echo "(exit 0)"
echo
echo "\$ heft eval --checkpoint=$run"
heft eval --checkpoint="$run"
echo
echo "\$ heft verify $run"
heft verify "$run"
echo
echo "\$ gsutil-style listing of $run/checkpoints (via etils epath)"
python - "$run" <<'EOF'
import sys
from etils import epath
for step in sorted(epath.Path(sys.argv[1], "checkpoints").iterdir(), key=lambda p: int(p.name)):
    print(step, sorted(p.name for p in step.iterdir()))
EOF
