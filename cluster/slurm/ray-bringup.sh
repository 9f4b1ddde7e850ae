#!/usr/bin/env bash
# Start a token-authenticated Ray cluster on the nodes of a SLURM allocation, and stop exactly that cluster.
#
# Two ways to use it:
#   source cluster/slurm/ray-bringup.sh          # what clearair.sbatch does
#   ray_cluster_up || exit 1                     # head on the first node, one worker per other node, wait for all
#   trap ray_cluster_down EXIT                   # stop the Ray processes this script started, nothing else
#
#   cluster/slurm/ray-bringup.sh CMD [ARGS...]   # up, run CMD with RAY_ADDRESS set, down; exits with CMD's status
#
# On a cluster each node is reached with `srun -w NODE`. Without srun (one machine, SLURM variables set by hand,
# e.g. SLURM_JOB_ID=1 SLURM_JOB_NODELIST=localhost SLURM_NNODES=1) the nodes must all be this machine and Ray is
# started directly. Teardown never calls `ray stop` (it stops every Ray of the user on the machine): it sends
# SIGTERM to the `ray start --block` processes it launched, which drain and stop their own node.
#
# Environment read (all optional except the first two):
#   SLURM_JOB_ID, SLURM_JOB_NODELIST   set by SLURM (or by hand)
#   SLURM_NNODES                       checked against the node list when set
#   SLURM_CPUS_PER_TASK                default for CLEARAIR_RAY_NUM_CPUS (Ray would otherwise claim the whole node)
#   RAY_AUTH_TOKEN_PATH                token file, default ~/.ray/auth_token: it must be on storage every node sees
#                                      (the home directory on SLURM clusters); created once with mode 600
#   RAY_AUTH_TOKEN                     a token given directly instead of the file (takes precedence in Ray)
#   CLEARAIR_RAY_PORT                  GCS port of the head (6379)
#   CLEARAIR_RAY_DASHBOARD_PORT        dashboard port, bound to 127.0.0.1 (8265); reach it with ssh -L
#   CLEARAIR_RAY_CLIENT_PORT           Ray client server port (10001)
#   CLEARAIR_RAY_HEAD_IP               address workers and the driver use (default: 127.0.0.1 for one node,
#                                      else `hostname --ip-address` of the first node)
#   CLEARAIR_RAY_NUM_CPUS, CLEARAIR_RAY_NUM_GPUS, CLEARAIR_RAY_MEMORY, CLEARAIR_RAY_OBJECT_STORE_MEMORY
#                                      per-node resources (GPUs default to what CUDA_VISIBLE_DEVICES shows)
#   CLEARAIR_RAY_TEMP_DIR              Ray's per-node temp dir (/tmp/ray_$SLURM_JOB_ID; keep it short: sockets)
#   CLEARAIR_RAY_STATE_DIR             where PIDs and node logs go (${TMPDIR:-/tmp}/clearair-ray-$SLURM_JOB_ID)
#   CLEARAIR_RAY_START_TIMEOUT         seconds to wait for all nodes (300)
#   CLEARAIR_RAY_STOP_GRACE            seconds a node may take to stop before SIGKILL (60)
#
# Exported by ray_cluster_up: RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH, RAY_ADDRESS and CLEARAIR_RAY_HEAD_ADDRESS
# (HEAD_IP:PORT), so `ray status`, drivers and `clearair run --ray-address` find and authenticate to the cluster.

_rb_log() { echo "[ray-bringup] $*" >&2; }

_rb_defaults() {
    CLEARAIR_RAY_PORT=${CLEARAIR_RAY_PORT:-6379}
    CLEARAIR_RAY_DASHBOARD_PORT=${CLEARAIR_RAY_DASHBOARD_PORT:-8265}
    CLEARAIR_RAY_CLIENT_PORT=${CLEARAIR_RAY_CLIENT_PORT:-10001}
    CLEARAIR_RAY_NUM_CPUS=${CLEARAIR_RAY_NUM_CPUS:-${SLURM_CPUS_PER_TASK:-}}
    CLEARAIR_RAY_TEMP_DIR=${CLEARAIR_RAY_TEMP_DIR:-/tmp/ray_${SLURM_JOB_ID}}
    CLEARAIR_RAY_STATE_DIR=${CLEARAIR_RAY_STATE_DIR:-${TMPDIR:-/tmp}/clearair-ray-${SLURM_JOB_ID}}
    CLEARAIR_RAY_START_TIMEOUT=${CLEARAIR_RAY_START_TIMEOUT:-300}
    CLEARAIR_RAY_STOP_GRACE=${CLEARAIR_RAY_STOP_GRACE:-60}
}

# Print the allocation's host names, one per line.
ray_node_list() {
    if command -v scontrol >/dev/null 2>&1; then
        scontrol show hostnames "$SLURM_JOB_NODELIST"
        return
    fi
    case $SLURM_JOB_NODELIST in
        *'['*)
            _rb_log "error: scontrol is needed to expand the node list $SLURM_JOB_NODELIST"
            return 1
            ;;
    esac
    tr ',' '\n' <<<"$SLURM_JOB_NODELIST"
}

_rb_is_local() {
    case $1 in
        localhost | 127.0.0.1 | "$(hostname)" | "$(hostname -s)") return 0 ;;
    esac
    return 1
}

# Set _RB_LAUNCH to the command prefix that runs a program on node $1.
_rb_launcher() {
    if command -v srun >/dev/null 2>&1; then
        _RB_LAUNCH=(srun --nodes=1 --ntasks=1 --overlap -w "$1")
    elif _rb_is_local "$1"; then
        _RB_LAUNCH=()
    else
        _rb_log "error: srun is not available and node $1 is not this machine"
        return 1
    fi
}

# Export RAY_AUTH_MODE=token and make sure the token file exists (generated once, mode 600).
ray_token_init() {
    export RAY_AUTH_MODE=token
    if [[ -n ${RAY_AUTH_TOKEN:-} ]]; then
        return 0
    fi
    export RAY_AUTH_TOKEN_PATH=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
    local dir tmp
    dir=$(dirname "$RAY_AUTH_TOKEN_PATH")
    [[ -d $dir ]] || mkdir -p -m 700 "$dir" || return 1
    if [[ ! -s $RAY_AUTH_TOKEN_PATH ]]; then
        tmp="$RAY_AUTH_TOKEN_PATH.tmp.$$"
        (umask 077 && head -c 32 /dev/urandom | od -An -v -tx1 | tr -d ' \n' >"$tmp") || return 1
        mv -n "$tmp" "$RAY_AUTH_TOKEN_PATH" || true # another job may have won the race: keep its token
        rm -f "$tmp"
        _rb_log "generated a Ray auth token in $RAY_AUTH_TOKEN_PATH"
    fi
    chmod 600 "$RAY_AUTH_TOKEN_PATH"
}

# Print the address the head will listen on.
_rb_head_ip() {
    local head=$1 nnodes=$2 out addr
    if [[ -n ${CLEARAIR_RAY_HEAD_IP:-} ]]; then
        echo "$CLEARAIR_RAY_HEAD_IP"
        return
    fi
    if [[ $nnodes == 1 ]]; then
        echo 127.0.0.1
        return
    fi
    _rb_launcher "$head" || return 1
    out=$("${_RB_LAUNCH[@]}" hostname --ip-address) || return 1
    for addr in $out; do # first IPv4 address
        if [[ $addr =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
            echo "$addr"
            return
        fi
    done
    echo "${out%% *}"
}

# Set _RB_NODE_ARGS to the `ray start` options every node gets.
_rb_node_args() {
    _RB_NODE_ARGS=(--block --disable-usage-stats --temp-dir "$CLEARAIR_RAY_TEMP_DIR")
    [[ -z ${CLEARAIR_RAY_NUM_CPUS:-} ]] || _RB_NODE_ARGS+=(--num-cpus "$CLEARAIR_RAY_NUM_CPUS")
    [[ -z ${CLEARAIR_RAY_NUM_GPUS:-} ]] || _RB_NODE_ARGS+=(--num-gpus "$CLEARAIR_RAY_NUM_GPUS")
    [[ -z ${CLEARAIR_RAY_MEMORY:-} ]] || _RB_NODE_ARGS+=(--memory "$CLEARAIR_RAY_MEMORY")
    [[ -z ${CLEARAIR_RAY_OBJECT_STORE_MEMORY:-} ]] ||
        _RB_NODE_ARGS+=(--object-store-memory "$CLEARAIR_RAY_OBJECT_STORE_MEMORY")
    return 0
}

# Start `ray start --head --block` on node $1 in the background and record its PID.
ray_start_head() {
    _rb_launcher "$1" || return 1
    _rb_log "starting the Ray head on $1 at $CLEARAIR_RAY_HEAD_ADDRESS"
    "${_RB_LAUNCH[@]}" ray start --head --node-ip-address "$CLEARAIR_RAY_HEAD_IP" --port "$CLEARAIR_RAY_PORT" \
        --dashboard-host 127.0.0.1 --dashboard-port "$CLEARAIR_RAY_DASHBOARD_PORT" \
        --ray-client-server-port "$CLEARAIR_RAY_CLIENT_PORT" "${_RB_NODE_ARGS[@]}" \
        >"$CLEARAIR_RAY_STATE_DIR/head.log" 2>&1 &
    echo $! >"$CLEARAIR_RAY_STATE_DIR/head.pid"
}

# Start one `ray start --block` worker per node given, each joining the head.
ray_start_workers() {
    local node i=0
    for node in "$@"; do
        _rb_launcher "$node" || return 1
        _rb_log "starting Ray worker $i on $node"
        "${_RB_LAUNCH[@]}" ray start --address "$CLEARAIR_RAY_HEAD_ADDRESS" "${_RB_NODE_ARGS[@]}" \
            >"$CLEARAIR_RAY_STATE_DIR/worker-$i.log" 2>&1 &
        echo $! >"$CLEARAIR_RAY_STATE_DIR/worker-$i.pid"
        i=$((i + 1))
    done
}

_rb_alive() {
    local stat
    stat=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ $stat != Z* ]]
}

# Fail (showing its log) if a node process we started has exited.
_rb_check_started() {
    local f
    for f in "$CLEARAIR_RAY_STATE_DIR"/*.pid; do
        [[ -f $f ]] || continue
        if ! _rb_alive "$(<"$f")"; then
            _rb_log "error: $(basename "$f" .pid) exited; its log:"
            tail -n 30 "${f%.pid}.log" >&2
            return 1
        fi
    done
}

# Count the active nodes in `ray status` output read from stdin.
_rb_count_active() {
    awk '/^Active:/ {a = 1; next} /^[A-Z][a-z]+:/ {a = 0} a && $1 ~ /^[0-9]+$/ {n += $1} END {print n + 0}'
}

# Wait until at least $1 nodes are active.
ray_wait_nodes() {
    local want=$1 have=0 status deadline=$((SECONDS + CLEARAIR_RAY_START_TIMEOUT))
    while ((SECONDS < deadline)); do
        _rb_check_started || return 1
        if status=$(timeout 60 ray status --address "$CLEARAIR_RAY_HEAD_ADDRESS" 2>/dev/null); then
            have=$(_rb_count_active <<<"$status")
            if ((have >= want)); then
                _rb_log "$have of $want Ray nodes are up"
                return 0
            fi
        fi
        sleep 2
    done
    _rb_log "error: $have of $want Ray nodes joined within ${CLEARAIR_RAY_START_TIMEOUT}s"
    return 1
}

# Bring the whole cluster up; on failure the caller should still run ray_cluster_down.
ray_cluster_up() {
    if [[ -z ${SLURM_JOB_ID:-} || -z ${SLURM_JOB_NODELIST:-} ]]; then
        _rb_log "error: SLURM_JOB_ID and SLURM_JOB_NODELIST must be set (run inside sbatch or set them by hand)"
        return 1
    fi
    _rb_defaults
    local listing
    listing=$(ray_node_list) || return 1
    mapfile -t _RB_NODES <<<"$listing"
    if [[ -n ${SLURM_NNODES:-} && $SLURM_NNODES != "${#_RB_NODES[@]}" ]]; then
        _rb_log "error: SLURM_NNODES=$SLURM_NNODES but the node list has ${#_RB_NODES[@]} entries"
        return 1
    fi
    local node
    for node in "${_RB_NODES[@]}"; do # fail before starting anything if a node cannot be reached
        _rb_launcher "$node" || return 1
    done
    mkdir -p "$CLEARAIR_RAY_STATE_DIR" || return 1
    ray_token_init || return 1
    CLEARAIR_RAY_HEAD_IP=$(_rb_head_ip "${_RB_NODES[0]}" "${#_RB_NODES[@]}") || return 1
    export CLEARAIR_RAY_HEAD_ADDRESS="$CLEARAIR_RAY_HEAD_IP:$CLEARAIR_RAY_PORT"
    _rb_node_args
    ray_start_head "${_RB_NODES[0]}" || return 1
    ray_wait_nodes 1 || return 1
    if ((${#_RB_NODES[@]} > 1)); then
        ray_start_workers "${_RB_NODES[@]:1}" || return 1
        ray_wait_nodes "${#_RB_NODES[@]}" || return 1
    fi
    export RAY_ADDRESS="$CLEARAIR_RAY_HEAD_ADDRESS"
}

# SIGTERM the given PIDs, wait up to the grace period, then SIGKILL what is left.
_rb_stop_pids() {
    local pid deadline=$((SECONDS + ${CLEARAIR_RAY_STOP_GRACE:-60}))
    for pid in "$@"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "$@"; do
        while _rb_alive "$pid" && ((SECONDS < deadline)); do
            sleep 0.5
        done
        if _rb_alive "$pid"; then
            _rb_log "node process $pid did not stop in time: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
}

# Stop the nodes this shell started (workers first, then the head). Safe to call twice.
ray_cluster_down() {
    local dir=${CLEARAIR_RAY_STATE_DIR:-} f
    [[ -n $dir && -d $dir ]] || return 0
    local -a workers=()
    for f in "$dir"/worker-*.pid; do
        [[ -f $f ]] && workers+=("$(<"$f")")
    done
    if ((${#workers[@]})); then
        _rb_log "stopping ${#workers[@]} Ray worker(s)"
        _rb_stop_pids "${workers[@]}"
        rm -f "$dir"/worker-*.pid
    fi
    if [[ -f $dir/head.pid ]]; then
        _rb_log "stopping the Ray head"
        _rb_stop_pids "$(<"$dir/head.pid")"
        rm -f "$dir/head.pid"
    fi
    return 0
}

_rb_main() {
    if (($# == 0)); then
        echo "usage: $0 CMD [ARGS...]   (or: source $0; ray_cluster_up; ...; ray_cluster_down)" >&2
        return 2
    fi
    [[ $1 != -- ]] || shift
    trap ray_cluster_down EXIT
    trap 'exit 143' TERM
    trap 'exit 130' INT
    ray_cluster_up || return 1
    "$@"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    set -uo pipefail
    _rb_main "$@"
    exit $?
fi
