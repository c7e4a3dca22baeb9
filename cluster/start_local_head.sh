#!/usr/bin/env bash
# Start a Ray head on this machine, with token authentication, to submit jobs/score.py to.
#
#   cluster/start_local_head.sh                   # then: see the lines it prints
#   cluster/start_local_head.sh --num-cpus 8      # any further `ray start` flags (e.g. --block)
#
# Environment (all optional): RAY (the ray executable), RAY_PORT (GCS, 6379), RAY_DASHBOARD_PORT
# (Jobs API, 8265), RAY_TEMP_DIR (/tmp/ray), RAY_AUTH_TOKEN_PATH (token file, ~/.ray/auth_token).
# The dashboard and Jobs API listen on 127.0.0.1 only; reach them from elsewhere through an SSH
# tunnel rather than opening the port.
set -euo pipefail

ray_bin=${RAY:-ray}
dashboard_port=${RAY_DASHBOARD_PORT:-8265}

# Ray 2.60 authenticates every client with a token: create one if there is none yet.
"$ray_bin" get-auth-token --generate >/dev/null
export RAY_AUTH_MODE=token

cat >&2 <<MSG
Ray head: dashboard and Jobs API on http://127.0.0.1:${dashboard_port} (token auth on).
Submit (from the repository root; clients need RAY_AUTH_MODE=token and the token file):
  RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:${dashboard_port} --working-dir . -- \\
      python jobs/score.py --config jobs/configs/demo.yaml
Stop: ray stop   (note: stops every Ray process of this machine's user, not only this head)
MSG

exec "$ray_bin" start --head \
  --port "${RAY_PORT:-6379}" \
  --dashboard-host 127.0.0.1 --dashboard-port "$dashboard_port" \
  --temp-dir "${RAY_TEMP_DIR:-/tmp/ray}" \
  --disable-usage-stats \
  "$@"
