#!/usr/bin/env bash
# A real (non-embedded) Ray cluster on this machine, to try `--address` the way a cluster runs it:
#   infra/local-cluster.sh start   # head with the dashboard (and the Jobs API for `shardwise submit`) on 127.0.0.1
#   shardwise run job.yaml --address auto
#   infra/local-cluster.sh stop
set -euo pipefail
case "${1:-}" in
  start) ray start --head --num-cpus="${NUM_CPUS:-$(( $(nproc) + 2 ))}" --include-dashboard=true --dashboard-host=127.0.0.1 ;;
  stop) ray stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
