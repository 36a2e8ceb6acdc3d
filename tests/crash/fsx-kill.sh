#!/usr/bin/env bash
# fsx-kill.sh: data integrity across server crashes.
# Goal: reads, writes, truncates and mmap I/O stay exactly right while the server is killed with
# SIGKILL and restarted: the client resends what had no reply, the server applies each
# transaction once, and fsx (which checks every read against its own model) sees no error.
# Method: run fsx (mmap variant, FSX_OPS ops, fixed seed) on a braid mount while the server is
# killed KILLS times at 1.5 s intervals and restarted on the same port and directories.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
braid=${BRAID:-$here/../../target/release/braid}
fsx=${FSX:-$(command -v fsx || echo "$HOME/.cargo/bin/fsx")}
ops=${FSX_OPS:-40000} kills=${KILLS:-6} seed=${FSX_SEED:-11}
work=$(mktemp -d /tmp/braid-fsx-kill.XXXXXX)
mkdir -p "$work/export" "$work/mnt"
port=0
server_pid=""

# Starts the server on $port (0: a free port, then kept for the restarts). Ready is when its own
# log says "serving ... listen=ADDR": a connect could reach another process's server on the port.
start_server() {
  local from
  from=$(($(stat -c %s "$work/server.log" 2>/dev/null || echo 0) + 1))
  "$braid" serve --data "$work/export" --state "$work/state" --listen "127.0.0.1:$port" --insecure --no-root-squash --lease 1 >>"$work/server.log" 2>&1 &
  server_pid=$!
  local listen
  for _ in $(seq 1 200); do
    listen=$(tail -c "+$from" "$work/server.log" | grep -o ' listen=[0-9.:]*' | head -1 || true)
    if [ -n "$listen" ]; then port=${listen##*:}; return 0; fi
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.05
  done
  echo "fsx-kill: server did not come up" >&2; tail -5 "$work/server.log" >&2; return 1
}
cleanup() {
  fusermount3 -u "$work/mnt" 2>/dev/null || umount -l "$work/mnt" 2>/dev/null || true
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
}
trap cleanup EXIT

start_server
"$braid" mount "127.0.0.1:$port" "$work/mnt" --log-file "$work/client.log" --insecure
"$fsx" -q -N "$ops" -S "$seed" -f "$here/../conformance/fsx-mmap.toml" -P "$work" "$work/mnt/fsx.file" >"$work/fsx.log" 2>&1 &
fsx_pid=$!
for k in $(seq 1 "$kills"); do
  sleep 1.5
  kill -0 "$fsx_pid" 2>/dev/null || { echo "fsx-kill: fsx ended before kill $k (raise FSX_OPS)" >&2; break; }
  kill -9 "$server_pid"; wait "$server_pid" 2>/dev/null || true
  start_server
done
if wait "$fsx_pid" && grep -q 'All operations completed A-OK' "$work/fsx.log"; then
  echo "fsx-kill: PASS ($ops ops, seed $seed, $kills server kills)"
  cleanup; trap - EXIT; rm -rf "$work"
else
  echo "fsx-kill: FAIL; logs in $work" >&2
  tail -20 "$work/fsx.log" >&2
  exit 1
fi
