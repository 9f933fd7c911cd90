#!/usr/bin/env bash
# A multi-node Ray cluster on ONE machine: a head node and N worker nodes, each its own raylet
# with its own CPUs, resources, temp dir and ports. For trying jobs/ against a real cluster
# (Jobs API, several raylets, object transfer between nodes) without cloud machines.
#
#   cluster/local.sh start     # starts the nodes; prints the client settings (as `env` does)
#   cluster/local.sh env       # export RAY_ADDRESS=http://127.0.0.1:<dashboard> RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=...
#   cluster/local.sh status    # nodes and their resources
#   cluster/local.sh stop      # stops THIS cluster's processes (and only them), checks none is left
#
# Then, from the repo root:
#   eval "$(cluster/local.sh env)"
#   ray job submit --working-dir . -- python jobs/migrate.py --config ...
#
# The cluster uses token authentication (Ray's default) with its own token, $PUMA_CLUSTER_DIR/auth_token.
#
# Settings (environment):
#   PUMA_CLUSTER_DIR      state + per-node temp dirs (default /tmp/puma-ray-local; keep it short:
#                         Ray's Unix sockets live under it and socket paths are limited to ~100 chars)
#   PUMA_CLUSTER_WORKERS  worker nodes beside the head (default 1)
#   PUMA_HEAD_CPUS        logical CPUs of the head (default 2); PUMA_WORKER_CPUS of each worker (default 2)
#   PUMA_WORKER_GPUS      GPUs of each worker node (default 0)
#   PUMA_OBJECT_STORE_BYTES  object store per node (default 300 MB)
#   PUMA_RAY_PORT, PUMA_DASHBOARD_PORT  head GCS / dashboard ports (default: free ones)
#   RAY                   the ray CLI (default: `ray` on PATH; use the one of the environment
#                         that has puma-ray installed: the cluster's workers run that Python)
#
# Every process of the cluster carries PUMA_RAY_CLUSTER=<cluster dir> in its environment; `stop`
# finds them by that marker and signals them by PID (SIGTERM, then SIGKILL after a grace
# period). Plain `ray stop` also works on a machine of your own, but it stops EVERY Ray on the
# machine, which is wrong on a shared box.
set -euo pipefail

DIR="${PUMA_CLUSTER_DIR:-/tmp/puma-ray-local}"
RAY="${RAY:-ray}"
STATE="$DIR/cluster.env"
GRACE="${PUMA_STOP_GRACE_S:-10}"  # seconds per step of stop before SIGKILL

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# PIDs of this cluster's processes: those whose environment holds our marker.
cluster_pids() {
  { grep -lzx "PUMA_RAY_CLUSTER=$DIR" /proc/[0-9]*/environ 2>/dev/null || true; } | sed -n 's#^/proc/\([0-9]*\)/environ$#\1#p'
}

node_ports() {  # the per-node ports Ray would otherwise pick from fixed defaults (52365, 10001, ...)
  echo "--node-manager-port=$(free_port) --object-manager-port=$(free_port)" \
       "--dashboard-agent-listen-port=$(free_port) --dashboard-agent-grpc-port=$(free_port)" \
       "--runtime-env-agent-port=$(free_port) --metrics-export-port=$(free_port)"
}

start() {
  if [[ -f "$STATE" ]] && [[ -n "$(cluster_pids)" ]]; then
    echo "error: a cluster is already running from $DIR (cluster/local.sh stop first)" >&2
    exit 1
  fi
  command -v "$RAY" >/dev/null || { echo "error: ray CLI not found (set RAY=/path/to/ray)" >&2; exit 1; }
  mkdir -p "$DIR"
  unset RAY_ADDRESS RAY_AUTH_TOKEN  # a client setting of another cluster must not leak into this one
  local port="${PUMA_RAY_PORT:-$(free_port)}" dash="${PUMA_DASHBOARD_PORT:-$(free_port)}"
  local workers="${PUMA_CLUSTER_WORKERS:-1}" store="${PUMA_OBJECT_STORE_BYTES:-300000000}"
  # Token authentication (Ray's default for `ray start`) with this cluster's own token: clients
  # use it via RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$DIR/auth_token (see `env`).
  if [[ ! -s "$DIR/auth_token" ]]; then
    (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32), end="")' >"$DIR/auth_token")
  fi
  # A one-machine cluster runs small trainings: Ray Train's controller polls its workers every 0.25 s
  # (Ray's default, 2 s, delays every epoch report and the end of each run; see runtime.init_ray).
  export PUMA_RAY_CLUSTER="$DIR" RAY_USAGE_STATS_ENABLED=0 RAY_TRAIN_V2_ENABLED="${RAY_TRAIN_V2_ENABLED:-1}" \
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="${RAY_TRAIN_HEALTH_CHECK_INTERVAL_S:-0.25}" \
    RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$DIR/auth_token"
  cat >"$STATE" <<EOF
GCS_ADDRESS=127.0.0.1:$port
DASHBOARD=http://127.0.0.1:$dash
WORKERS=$workers
EOF
  # shellcheck disable=SC2046
  "$RAY" start --head --node-ip-address=127.0.0.1 --port="$port" --dashboard-host=127.0.0.1 --dashboard-port="$dash" \
    --ray-client-server-port="$(free_port)" $(node_ports) \
    --num-cpus="${PUMA_HEAD_CPUS:-2}" --num-gpus=0 --resources='{"puma_head": 1}' \
    --object-store-memory="$store" --temp-dir="$DIR/head" --disable-usage-stats --log-style=record >"$DIR/head.log" 2>&1 \
    || { echo "error: head node failed to start, see $DIR/head.log" >&2; tail -20 "$DIR/head.log" >&2; exit 1; }
  for i in $(seq 1 "$workers"); do
    # shellcheck disable=SC2046
    "$RAY" start --address="127.0.0.1:$port" --node-ip-address=127.0.0.1 $(node_ports) \
      --num-cpus="${PUMA_WORKER_CPUS:-2}" --num-gpus="${PUMA_WORKER_GPUS:-0}" --resources="{\"puma_worker\": 1, \"puma_worker_$i\": 1}" \
      --object-store-memory="$store" --temp-dir="$DIR/worker$i" --disable-usage-stats --log-style=record >"$DIR/worker$i.log" 2>&1 \
      || { echo "error: worker node $i failed to start, see $DIR/worker$i.log" >&2; tail -20 "$DIR/worker$i.log" >&2; exit 1; }
  done
  env_lines
}

env_lines() {  # what a client shell needs: eval "$(cluster/local.sh env)"
  # shellcheck disable=SC1090
  . "$STATE"
  echo "export RAY_ADDRESS=$DASHBOARD RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$DIR/auth_token"
}

# Signal a set of PIDs: SIGTERM, wait up to $2 seconds, then SIGKILL what is left.
term_wait_kill() {
  local pids="$1" grace="$2" t alive p
  [[ -z "$pids" ]] && return 0
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null || true
  for ((t = 0; t < grace * 5; t++)); do
    alive=""
    for p in $pids; do [[ -e /proc/$p ]] && alive="$alive $p"; done
    [[ -z "$alive" ]] && return 0
    sleep 0.2
  done
  # shellcheck disable=SC2086
  kill -KILL $alive 2>/dev/null || true
  sleep 0.5
}

comm_is() { [[ "$(cat "/proc/$1/comm" 2>/dev/null)" == "$2" ]]; }

stop() {
  # Ray's own order (as `ray stop`): raylets first (they take their workers with them), then the
  # other processes (dashboard, agents, job drivers, ...), the GCS last.
  local p raylets="" rest="" left
  for p in $(cluster_pids); do comm_is "$p" raylet && raylets="$raylets $p"; done
  term_wait_kill "$raylets" "$GRACE"
  for p in $(cluster_pids); do comm_is "$p" gcs_server || rest="$rest $p"; done
  term_wait_kill "$rest" "$GRACE"
  term_wait_kill "$(cluster_pids)" "$GRACE"
  left="$(cluster_pids)"
  if [[ -n "$left" ]]; then
    echo "error: processes left after stop: $left" >&2
    exit 1
  fi
  rm -f "$STATE"
  echo "stopped (no process of $DIR left)"
}

status() {
  [[ -f "$STATE" ]] || { echo "not running (no $STATE)"; exit 3; }
  cat "$STATE"
  echo "processes: $(cluster_pids | wc -l)"
  # shellcheck disable=SC1090
  (. "$STATE" && RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$DIR/auth_token" "$RAY" status --address="$GCS_ADDRESS")
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) env_lines ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
