# bench/braid.sh: start and stop one braid server + mount for the benchmark scripts (sourced
# after the lab's lab.env). Needs BRAID (binary). Peers: braid (plain TCP), braid-tls (TLS 1.3
# with client certificates made by braid init).
BEXP=${BEXP:-$LAB/braid-export} BSTATE=${BSTATE:-$LAB/braid-state} BMNT=$MNTROOT/braid BTLS=$LAB/braid-tls
braid_up() {  # fresh export + state dirs each run; prints the mount point
  local port hex
  braid_down; rm -rf "$BEXP" "$BSTATE"; mkdir -p "$BEXP" "$BSTATE" "$BMNT"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  # shellcheck disable=SC2086 # word splitting of the per-peer argument lists is intended
  start_bg braid-server "$BRAID" serve --data "$BEXP" --listen "127.0.0.1:$port" --state "$BSTATE" $BRAID_SERVE_ARGS
  hex=$(printf ':%04X' "$port")   # wait until the port is in LISTEN (state 0A in /proc/net/tcp)
  for _ in $(seq 1 200); do
    awk -v p="$hex" '$4 == "0A" && substr($2, length($2) - 4) == p {f=1} END {exit !f}' /proc/net/tcp && break
    sleep 0.1
  done
  # --foreground under start_bg: the client's pid is recorded, so teardown stops it by pid
  # shellcheck disable=SC2086
  start_bg braid-client "$BRAID" mount "127.0.0.1:$port" "$BMNT" --foreground $BRAID_MOUNT_ARGS
  wait_mounted "$BMNT" 40 || { cat "$LAB/braid-server.out" "$LAB/braid-client.out" >&2; return 1; }
  echo "$BMNT"
}
braid_down() {
  local cpid
  mountpoint -q "$BMNT" && { timeout 30 "$BRAID" umount "$BMNT" >/dev/null 2>&1 || unmount "$BMNT"; }
  # the client exits by itself once unmounted: give it 5 s before stop_pid TERMs it
  cpid=$(cat "$PIDDIR/braid-client.pid" 2>/dev/null)
  for _ in $(seq 1 50); do { [ -n "$cpid" ] && kill -0 "$cpid" 2>/dev/null; } || break; sleep 0.1; done
  stop_pid braid-client; stop_pid braid-server
}
braid_peer_up() {  # braid_peer_up braid|braid-tls: prints the mount point
  case $1 in
    braid) BRAID_SERVE_ARGS="--insecure --no-root-squash" BRAID_MOUNT_ARGS="--insecure" braid_up ;;
    braid-tls)
      [ -f "$BTLS/ca.pem" ] || "$BRAID" init --dir "$BTLS" --server-name 127.0.0.1 >/dev/null || return 1
      BRAID_SERVE_ARGS="--tls-dir $BTLS --no-root-squash" BRAID_MOUNT_ARGS="--tls-dir $BTLS" braid_up ;;
    *) log "not a braid peer: $1"; return 1 ;;
  esac
}
