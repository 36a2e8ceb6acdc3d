#!/usr/bin/env bash
# with-mount.sh CMD [ARGS...]
#
# Runs CMD against a fresh braid file system: starts `braid serve` on a new temp export dir + state dir,
# listening on 127.0.0.1:<free port>, mounts it with `braid mount` on a temp mount point, runs CMD with
#   BRAID_MNT=<mount point>  BRAID_EXPORT=<export dir>  BRAID_STATE=<state dir>  BRAID_ADDR=<host:port>
#   BRAID_SERVER_PID=<pid>   BRAID_CLIENT_PID=<pid>
# With SECOND_MOUNT=1, a second client mounts the same export on another mount point:
#   BRAID_MNT2=<its mount point>  BRAID_CLIENT2_PID=<pid>
# then unmounts and stops the daemons (EXIT trap: also on failure or Ctrl-C). Exit status = CMD's.
# Daemon logs are printed (tail) when CMD fails, and kept with the temp dir if KEEP=1.
#
# Env: BRAID (binary, default <repo>/target/release/braid), MOUNT_TIMEOUT (s, default 20), KEEP=1.
# shellcheck disable=SC2317  # functions below are called from the EXIT trap
set -uo pipefail
[ $# -gt 0 ] || { echo "usage: with-mount.sh CMD [ARGS...]" >&2; exit 2; }
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BRAID=${BRAID:-${CARGO_TARGET_DIR:-$REPO/target}/release/braid}
[ -x "$BRAID" ] || { echo "with-mount: braid binary not found: $BRAID (cargo build --release, or set BRAID)" >&2; exit 2; }
DEADLINE=${MOUNT_TIMEOUT:-20}

T=$(mktemp -d /tmp/braid-e2e.XXXXXX)
EXPORT=$T/export STATE=$T/state MNT=$T/mnt MNT2=$T/mnt2
mkdir -p "$EXPORT" "$STATE" "$MNT" "$MNT2"
# mktemp -d makes $T 0700: the unprivileged users of the suites (pjdfstest: nobody, tests) must
# be able to reach the mount point, or every permission test fails with EACCES on the path.
chmod 755 "$T"
spid="" cpid="" cpid2="" rc=99
say() { echo "with-mount: $*" >&2; }
mounted() { grep -qs " ${1:-$MNT} fuse" /proc/self/mounts; }   # also true for a dead client ("not connected")
alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }
# stop PID: TERM, wait up to 10 s, then KILL (only processes this script started)
stop() { alive "$1" || return 0; kill "$1" 2>/dev/null
  for _ in $(seq 1 100); do alive "$1" || return 0; sleep 0.1; done
  say "pid $1 ignored TERM, KILL"; kill -9 "$1" 2>/dev/null; }

unmount() {  # unmount MOUNTPOINT CLIENT_PID
  if mounted "$1"; then
    # braid's own umount first; fusermount3 as a fallback; lazy as the last resort (a hung client)
    timeout 20 "$BRAID" umount "$1" >/dev/null 2>&1 || timeout 20 fusermount3 -u "$1" 2>/dev/null ||
      { say "unmount failed, lazy unmount"; fusermount3 -uz "$1" 2>/dev/null || umount -l "$1"; }
  fi
  # the client exits by itself once unmounted; give it a few seconds before stop() TERMs it
  for _ in $(seq 1 50); do alive "$2" || break; sleep 0.1; done
  stop "$2"
}

cleanup() {
  trap - EXIT INT TERM
  unmount "$MNT" "$cpid"; unmount "$MNT2" "$cpid2"; stop "$spid"
  if [ "$rc" != 0 ]; then
    for f in server client client2; do [ -s "$T/$f.log" ] && { say "--- $f log (tail)"; tail -20 "$T/$f.log" >&2; }; done
  fi
  if [ "${KEEP:-0}" = 1 ] || mounted "$MNT" || mounted "$MNT2"; then say "kept $T"; else rm -rf "$T"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'rc=130; exit' INT
trap 'rc=143; exit' TERM

# A free port: let the kernel pick one, then release it (tiny race, acceptable for a test rig).
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
ADDR=127.0.0.1:$PORT
"$BRAID" serve --data "$EXPORT" --listen "$ADDR" --state "$STATE" --insecure --no-root-squash >"$T/server.log" 2>&1 &
spid=$!
# wait (deadline) until the port is in LISTEN state: /proc/net/tcp, state 0A, local port in hex
hexport=$(printf ':%04X' "$PORT")
for _ in $(seq 1 $((DEADLINE * 10))); do
  awk -v p="$hexport" '$4 == "0A" && substr($2, length($2) - 4) == p {f=1} END {exit !f}' /proc/net/tcp && break
  alive "$spid" || { say "braid serve exited early"; exit; }
  sleep 0.1
done
alive "$spid" || { say "braid serve exited early"; exit; }

# mount MOUNTPOINT LOG: --foreground in the background, so we keep the client's pid (to stop
# it) and its log; the pid is left in $last_pid
mount_client() {
  "$BRAID" mount "$ADDR" "$1" --foreground --insecure >"$2" 2>&1 &
  last_pid=$!
  for _ in $(seq 1 $((DEADLINE * 10))); do
    mountpoint -q "$1" && return 0
    alive "$last_pid" || { say "braid mount exited before the mount was up"; return 1; }
    sleep 0.1
  done
  say "not mounted after ${DEADLINE}s: $1"; return 1
}
mount_client "$MNT" "$T/client.log" || exit
cpid=$last_pid
if [ "${SECOND_MOUNT:-0}" = 1 ]; then
  mount_client "$MNT2" "$T/client2.log" || exit
  cpid2=$last_pid
fi

BRAID_MNT=$MNT BRAID_EXPORT=$EXPORT BRAID_STATE=$STATE BRAID_ADDR=$ADDR \
  BRAID_SERVER_PID=$spid BRAID_CLIENT_PID=$cpid BRAID_MNT2=$MNT2 BRAID_CLIENT2_PID=$cpid2 "$@"
rc=$?
alive "$spid" || say "WARNING: braid serve is no longer running (crashed during CMD?)"
alive "$cpid" || say "WARNING: braid mount client is no longer running (crashed during CMD?)"
[ -z "$cpid2" ] || alive "$cpid2" || say "WARNING: the second braid mount client is no longer running (crashed during CMD?)"
exit "$rc"
