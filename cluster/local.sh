#!/usr/bin/env bash
# cluster/local.sh up|down|status — a real multi-node Ray cluster on this one machine, on loopback.
#
# A head node on 127.0.0.2 (no CPUs by default, so trials never land there; it runs the sweep driver and
# the dashboard) plus N worker nodes on 127.0.0.3, 127.0.0.4, ... Each node is its own `ray start --block`
# with its own raylet, resources and loopback address (Ray rewrites 127.0.0.1 to the outside address, so
# 127.0.0.1 is never used). Token auth is off (RAY_AUTH_MODE=disabled). The dashboard, Ray Client and the
# agents' HTTP bind loopback; Ray binds the nodes' gRPC servers and metrics exporters to all interfaces
# (only a node address of exactly 127.0.0.1 keeps them on loopback): use it on a firewalled machine.
#
# `up` records the PIDs it started (with their start times) in the state dir and prints
#   RAY_ADDRESS=<head>:<port>
#   RAY_DASHBOARD=http://<dashboard host>:<port>
# `down` stops exactly those processes and their children (SIGTERM, then SIGKILL after a timeout); it
# never runs `ray stop`, which would stop every Ray instance on the machine.
#
# Options (each also settable by env):
#   --workers N        PROMPTSWEEP_CLUSTER_WORKERS   worker nodes (default 2)
#   --cpus N           PROMPTSWEEP_WORKER_CPUS       logical CPUs per worker (default 1)
#   --gpus N           PROMPTSWEEP_WORKER_GPUS       logical GPUs per worker (default 0; scheduling only)
#   --head-cpus N      PROMPTSWEEP_HEAD_CPUS         CPUs on the head (default 0)
# Env only:
#   PROMPTSWEEP_CLUSTER_DIR     state dir: pids, logs, env file (default cluster/.local/ in the repo)
#   PROMPTSWEEP_RAY_PORT        GCS port (default 6390)
#   PROMPTSWEEP_DASHBOARD_HOST  dashboard bind address (default 127.0.0.2)
#   PROMPTSWEEP_DASHBOARD_PORT  dashboard / job API port (default 8266)
#   PROMPTSWEEP_RAY_CLIENT_PORT Ray Client port (default 23001; outside Ray's worker port range)
#   PROMPTSWEEP_AGENT_PORT_BASE node i's dashboard agent listens on base+i (default 52400)
#   PROMPTSWEEP_OBJECT_STORE_MB object store per node in MiB (default 256)
#   PROMPTSWEEP_STOP_TIMEOUT    seconds between SIGTERM and SIGKILL in `down` (default 20)
#   PROMPTSWEEP_START_TIMEOUT   seconds to wait for each node / the whole cluster (default 120)
#   PROMPTSWEEP_RAY             the `ray` executable (default: the repo's .venv/bin/ray, else ray on PATH)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${PROMPTSWEEP_CLUSTER_DIR:-$REPO/cluster/.local}"
PIDS="$STATE/pids"
ENVF="$STATE/env"

WORKERS="${PROMPTSWEEP_CLUSTER_WORKERS:-2}"
CPUS="${PROMPTSWEEP_WORKER_CPUS:-1}"
GPUS="${PROMPTSWEEP_WORKER_GPUS:-0}"
HEAD_CPUS="${PROMPTSWEEP_HEAD_CPUS:-0}"
HEAD_IP=127.0.0.2
PORT="${PROMPTSWEEP_RAY_PORT:-6390}"
DASH_HOST="${PROMPTSWEEP_DASHBOARD_HOST:-127.0.0.2}"
DASH_PORT="${PROMPTSWEEP_DASHBOARD_PORT:-8266}"
CLIENT_PORT="${PROMPTSWEEP_RAY_CLIENT_PORT:-23001}"
AGENT_BASE="${PROMPTSWEEP_AGENT_PORT_BASE:-52400}"
OBJ_MB="${PROMPTSWEEP_OBJECT_STORE_MB:-256}"
STOP_TIMEOUT="${PROMPTSWEEP_STOP_TIMEOUT:-20}"
START_TIMEOUT="${PROMPTSWEEP_START_TIMEOUT:-120}"
if [[ -n "${PROMPTSWEEP_RAY:-}" ]]; then RAY="$PROMPTSWEEP_RAY"
elif [[ -x "$REPO/.venv/bin/ray" ]]; then RAY="$REPO/.venv/bin/ray"
else RAY="$(command -v ray || true)"; fi
export RAY_AUTH_MODE=disabled
# jobs (`ray job submit`) run their entrypoint with the nodes' PATH: let `python` be the one Ray runs on
[[ -n "$RAY" ]] && export PATH="$(dirname "$RAY"):$PATH"

die() { echo "local.sh: error: $*" >&2; exit 2; }
note() { echo "local.sh: $*" >&2; }

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# --- process bookkeeping --------------------------------------------------------------------------
starttime() {  # the kernel's start time of a PID (field 22 of /proc/PID/stat), empty if gone
  local s rest
  s="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
  rest="${s##*) }"
  # shellcheck disable=SC2086
  set -- $rest
  echo "${20}"
}

alive() {  # alive PID STARTTIME: the same process we recorded is still running (not a reused PID)
  [[ -n "$2" && "$(starttime "$1")" == "$2" ]]
}

descendants() {  # all live descendants of the given PIDs (by parent links in /proc)
  local frontier=("$@") out=() next p c
  local table
  table="$(ps -e -o pid=,ppid= 2>/dev/null || true)"
  while ((${#frontier[@]})); do
    next=()
    for p in "${frontier[@]}"; do
      while read -r c; do
        [[ -n "$c" ]] && { out+=("$c"); next+=("$c"); }
      done < <(awk -v pp="$p" '$2 == pp {print $1}' <<<"$table")
    done
    frontier=("${next[@]+"${next[@]}"}")
  done
  echo "${out[@]+"${out[@]}"}"
}

recorded_alive() {  # "pid starttime role" lines of recorded processes that are still running
  [[ -f "$PIDS" ]] || return 0
  local pid st role
  while read -r pid st role; do
    alive "$pid" "$st" && echo "$pid $st $role"
  done <"$PIDS"
  return 0
}

start_node() {  # start_node ROLE LOG ARGS... : one `ray start --block` in its own session; records its PID
  local role="$1" log="$2"; shift 2
  setsid "$RAY" start --block --disable-usage-stats --temp-dir="$TMPD" "$@" >"$log" 2>&1 </dev/null &
  local pid=$!
  sleep 0.2
  echo "$pid $(starttime "$pid") $role" >>"$PIDS"
  wait_started "$pid" "$log" "$role"
}

wait_started() {  # until `ray start` prints that the runtime started (the raylet registered) or dies
  local pid="$1" log="$2" role="$3" t=0
  until grep -q "Ray runtime started" "$log" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
      note "$role failed to start; its log ($log) ends with:"; tail -n 15 "$log" >&2 || true
      stop_all >/dev/null 2>&1 || true
      die "$role did not start (port taken? set PROMPTSWEEP_RAY_PORT / PROMPTSWEEP_DASHBOARD_PORT / PROMPTSWEEP_AGENT_PORT_BASE)"
    fi
    sleep 0.5; t=$((t + 1))
    if ((t > START_TIMEOUT * 2)); then
      stop_all >/dev/null 2>&1 || true
      die "$role did not start within ${START_TIMEOUT}s (see $log)"
    fi
  done
}

wait_nodes() {  # until the dashboard answers and lists the expected number of alive nodes
  local want="$1" t=0 py
  py="$(dirname "$RAY")/python"; [[ -x "$py" ]] || py=python3
  until "$py" - "$DASH_HOST" "$DASH_PORT" "$want" <<'EOF' 2>/dev/null
import json, sys, urllib.request
host, port, want = sys.argv[1], sys.argv[2], int(sys.argv[3])
url = f"http://{host}:{port}/api/v0/nodes?limit=1000&detail=false"
with urllib.request.urlopen(url, timeout=5) as r:
    nodes = json.load(r)["data"]["result"]["result"]
alive = [n for n in nodes if n.get("state") == "ALIVE"]
sys.exit(0 if len(alive) >= want else 1)
EOF
  do
    sleep 1; t=$((t + 1))
    if ((t > START_TIMEOUT)); then
      stop_all >/dev/null 2>&1 || true
      die "the cluster did not show $want alive nodes at http://$DASH_HOST:$DASH_PORT within ${START_TIMEOUT}s (logs in $STATE)"
    fi
  done
}

stop_all() {  # SIGTERM the recorded `ray start` processes and their children, SIGKILL what is left
  local lines pid st role targets=() pidlist=() t=0 left
  lines="$(recorded_alive)"
  if [[ -n "$lines" ]]; then
    while read -r pid st role; do pidlist+=("$pid"); done <<<"$lines"
    # children first gathered (raylet, gcs, agents, workers), so they can be checked after their parent exits
    for pid in ${pidlist[@]+"${pidlist[@]}"} $(descendants "${pidlist[@]}"); do
      targets+=("$pid:$(starttime "$pid")")
    done
    # workers before the head, as a real cluster shuts down
    for pid in $(tac <<<"$lines" | awk '{print $1}'); do kill -TERM "$pid" 2>/dev/null || true; done
    while :; do
      left=()
      for x in "${targets[@]}"; do alive "${x%%:*}" "${x#*:}" && left+=("$x"); done
      ((${#left[@]} == 0)) && break
      if ((t >= STOP_TIMEOUT * 2)); then
        note "SIGKILL to ${#left[@]} process(es) still running after ${STOP_TIMEOUT}s"
        for x in "${left[@]}"; do alive "${x%%:*}" "${x#*:}" && kill -KILL "${x%%:*}" 2>/dev/null || true; done
        sleep 1
        break
      fi
      sleep 0.5; t=$((t + 1))
    done
    note "stopped ${#targets[@]} process(es)"
  fi
  if [[ -f "$STATE/temp_dir" ]]; then
    local d; d="$(cat "$STATE/temp_dir")"
    [[ "$d" == /tmp/psray.* ]] && rm -rf "$d"
  fi
  rm -f "$PIDS" "$ENVF" "$STATE/temp_dir"
}

# --- commands -------------------------------------------------------------------------------------
cmd_up() {
  [[ -n "$RAY" && -x "$RAY" ]] || die "no 'ray' executable found: run 'make setup' (creates .venv) or set PROMPTSWEEP_RAY"
  [[ "$WORKERS" =~ ^[0-9]+$ && "$WORKERS" -ge 1 && "$WORKERS" -le 250 ]] || die "--workers must be 1..250 (got '$WORKERS')"
  for v in "$CPUS" "$GPUS" "$HEAD_CPUS"; do [[ "$v" =~ ^[0-9]+$ ]] || die "--cpus/--gpus/--head-cpus take whole numbers (got '$v')"; done
  mkdir -p "$STATE"
  if [[ -n "$(recorded_alive)" ]]; then
    die "a local cluster is already up (state in $STATE); run 'cluster/local.sh down' first"
  fi
  rm -f "$PIDS"
  TMPD="$(mktemp -d /tmp/psray.XXXXXX)"  # short: Ray's unix socket paths must stay under 108 bytes
  echo "$TMPD" >"$STATE/temp_dir"
  local obj=$((OBJ_MB * 1024 * 1024))

  start_node head "$STATE/head.log" --head --node-ip-address="$HEAD_IP" --port="$PORT" \
    --num-cpus="$HEAD_CPUS" --num-gpus=0 --object-store-memory="$obj" \
    --dashboard-host="$DASH_HOST" --dashboard-port="$DASH_PORT" --ray-client-server-port="$CLIENT_PORT" \
    --dashboard-agent-listen-port="$AGENT_BASE"
  local i ip
  for ((i = 1; i <= WORKERS; i++)); do  # one at a time: nodes started together race for socket names
    ip="127.0.0.$((i + 2))"
    start_node "worker$i" "$STATE/worker$i.log" --address="$HEAD_IP:$PORT" --node-ip-address="$ip" \
      --num-cpus="$CPUS" --num-gpus="$GPUS" --object-store-memory="$obj" \
      --resources="{\"local_worker_$i\": 1}" --dashboard-agent-listen-port="$((AGENT_BASE + i))"
  done
  wait_nodes "$((WORKERS + 1))"
  {
    echo "RAY_ADDRESS=$HEAD_IP:$PORT"
    echo "RAY_DASHBOARD=http://$DASH_HOST:$DASH_PORT"
  } >"$ENVF"
  cat "$ENVF"
  note "up: head $HEAD_IP ($HEAD_CPUS CPU) + $WORKERS worker(s) 127.0.0.3.. ($CPUS CPU, $GPUS GPU each); state in $STATE"
  note "submit: ray job submit --address http://$DASH_HOST:$DASH_PORT --working-dir . -- python -m orchestrator.sweep SPEC --output /ABS/SHARED/PATH"
}

cmd_down() {
  [[ -f "$PIDS" ]] || { note "no local cluster recorded in $STATE"; rm -f "$ENVF"; return 0; }
  stop_all
}

cmd_status() {
  local lines n_rec=0 n_alive=0
  [[ -f "$PIDS" ]] || { echo "down (no cluster recorded in $STATE)"; return 3; }
  n_rec=$(wc -l <"$PIDS")
  lines="$(recorded_alive)"
  [[ -n "$lines" ]] && n_alive=$(wc -l <<<"$lines")
  local pid st role
  while read -r pid st role; do
    if alive "$pid" "$st"; then echo "$role pid=$pid running"; else echo "$role pid=$pid gone"; fi
  done <"$PIDS"
  if ((n_alive == n_rec)); then
    cat "$ENVF" 2>/dev/null || true
    echo "up ($n_alive node(s))"
    return 0
  fi
  echo "degraded: $n_alive of $n_rec node(s) running; run 'cluster/local.sh down' and 'up' again"
  return 3
}

main() {
  local cmd="${1:-}"; shift || true
  while (($#)); do
    case "$1" in
      --workers) WORKERS="${2:?--workers needs a value}"; shift 2 ;;
      --cpus) CPUS="${2:?--cpus needs a value}"; shift 2 ;;
      --gpus) GPUS="${2:?--gpus needs a value}"; shift 2 ;;
      --head-cpus) HEAD_CPUS="${2:?--head-cpus needs a value}"; shift 2 ;;
      -h|--help) usage ;;
      *) die "unknown option '$1' (see cluster/local.sh --help)" ;;
    esac
  done
  case "$cmd" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    -h|--help|help) usage ;;
    *) die "usage: cluster/local.sh up|down|status [--workers N] [--cpus N] [--gpus N] [--head-cpus N]" ;;
  esac
}

main "$@"
