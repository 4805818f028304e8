#!/usr/bin/env bash
# Start a real Ray head on 127.0.0.1 to try cluster mode on one machine (token auth on, as on a
# real cluster). Stop it with Ctrl-C: `ray start --block` stops only the processes it started.
#
#   cluster/local.sh [NUM_CPUS]            # then, in another shell:
#   export RAY_ADDRESS=http://127.0.0.1:8265
#   orchestrator submit jobs/cluster-local.yaml --follow
set -euo pipefail
num_cpus="${1:-$(nproc)}"
if ! ray get-auth-token >/dev/null 2>&1; then
  ray get-auth-token --generate >/dev/null   # ~/.ray/auth_token; orchestrator's client sends it too
fi
# The job's workers get the store's credentials from the submitting shell (runtime env), not from here.
exec env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SESSION_TOKEN \
  RAY_AUTH_MODE=token RAY_ADDRESS=127.0.0.1:6379 \
  ray start --head --block --node-ip-address=127.0.0.1 --port=6379 \
  --dashboard-host=127.0.0.1 --dashboard-port=8265 --num-cpus="$num_cpus"
