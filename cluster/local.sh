#!/usr/bin/env bash
# Start a real Ray head on 127.0.0.1 to try cluster mode on one machine (token auth on, as on a
# real cluster). Stop it with Ctrl-C: `ray start --block` stops only the processes it started.
#
#   cluster/local.sh [NUM_CPUS]            # then, in another shell:
#   export RAY_ADDRESS=http://127.0.0.1:8265
#   orchestrator submit jobs/cluster-local.yaml --follow
# RAY_HEAD_PORT (6379) and RAY_DASHBOARD_PORT (8265) move it when those ports are taken. The job
# agent takes any free port (RAY_DASHBOARD_AGENT_PORT sets one): at Ray's fixed 52365 it cannot start
# beside another Ray on this machine, and the head then answers every submission "No available agent".
set -euo pipefail
num_cpus="${1:-$(nproc)}"
gcs_port="${RAY_HEAD_PORT:-6379}"
dashboard_port="${RAY_DASHBOARD_PORT:-8265}"
if ! ray get-auth-token >/dev/null 2>&1; then
  ray get-auth-token --generate >/dev/null   # ~/.ray/auth_token; orchestrator's client sends it too
fi
# The jobs get the store's credentials from the submitting shell (orchestrator submit), not from here.
exec env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SESSION_TOKEN \
  RAY_AUTH_MODE=token RAY_ADDRESS="127.0.0.1:$gcs_port" \
  ray start --head --block --node-ip-address=127.0.0.1 --port="$gcs_port" \
  --dashboard-host=127.0.0.1 --dashboard-port="$dashboard_port" --num-cpus="$num_cpus" \
  --resources='{"orchestrator_trial_slots": 1}' \
  --dashboard-agent-listen-port="${RAY_DASHBOARD_AGENT_PORT:-0}"
