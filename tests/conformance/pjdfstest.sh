#!/usr/bin/env bash
# pjdfstest.sh [MOUNTDIR]   (default: $BRAID_MNT, as set by tests/e2e/with-mount.sh)
#
# Runs pjdfstest (POSIX syscall semantics; `cargo install pjdfstest`) on MOUNTDIR with the vendored
# pjdfstest-linux.toml, then compares the failing test names with pjdfstest-expected-failures.txt
# (one name per line, '#' comments = the reason). Exit 1 if a failure is not in that list (or the run
# aborted/timed out); allow-listed tests that now pass are reported so the list can be shrunk.
# Must run as root: about a third of the tests chown/mknod/switch users and are skipped otherwise.
#
# Env: NAPTIME (settings.naptime, s; must exceed the FS timestamp granularity, default 0.01 from the
#      config), PJDFS_TIMEOUT (s, default 900), PJDFS_OUT (result dir, default a new /tmp dir),
#      SECONDARY (dir on another FS for the EXDEV tests, default /dev/shm/pjdfs-secondary),
#      PJDFSTEST (binary), extra args = test-name filters passed to pjdfstest.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=${1:-${BRAID_MNT:-}}; [ $# -gt 0 ] && shift
if [ -z "$DIR" ] || ! DIR=$(cd "$DIR" 2>/dev/null && pwd); then echo "usage: pjdfstest.sh MOUNTDIR [FILTER...]" >&2; exit 2; fi
ALLOW=$HERE/pjdfstest-expected-failures.txt
OUT=${PJDFS_OUT:-$(mktemp -d /tmp/pjdfstest.XXXXXX)}
SECONDARY=${SECONDARY:-/dev/shm/pjdfs-secondary}
PJDFSTEST=${PJDFSTEST:-$(command -v pjdfstest || echo "$HOME/.cargo/bin/pjdfstest")}
[ -x "$PJDFSTEST" ] || { echo "pjdfstest not found (scripts/install-deps.sh)" >&2; exit 2; }
[ "$(id -u)" = 0 ] || echo "WARNING: not root: root-only tests will be skipped" >&2
mkdir -p "$OUT" "$SECONDARY"

# The config's [dummy_auth] users: nobody/nogroup (Debian default) and tests/tests (created here).
getent passwd tests >/dev/null || useradd -M -r -U -s /usr/sbin/nologin -d / tests || exit 2
cfg=$OUT/pjdfstest.toml
sed -E "${NAPTIME:+s/^naptime *=.*/naptime = $NAPTIME/}" "$HERE/pjdfstest-linux.toml" >"$cfg"

# umask 022: several tests check the mode of created files. cd $OUT: keep pjdfstest's cwd off the FS.
# RUST_BACKTRACE=0 keeps the log down to the assertion messages.
( umask 022; cd "$OUT" && RUST_BACKTRACE=0 timeout -k 20 "${PJDFS_TIMEOUT:-900}" \
    "$PJDFSTEST" -c "$cfg" -p "$DIR" -s "$SECONDARY" "$@" ) >"$OUT/log" 2>&1
rc=$?

# Per-test lines are "<name>   <status>", status: ok | FAILED | skipped (reason on the next line).
awk '$NF=="FAILED" {print $1}' "$OUT/log" | sort -u >"$OUT/failed"
grep -v '^[[:space:]]*#' "$ALLOW" | awk 'NF {print $1}' | sort -u >"$OUT/allowed"
comm -23 "$OUT/failed" "$OUT/allowed" >"$OUT/unexpected"
# stale = allow-listed, ran, and passed (filtered-out tests are not stale)
awk '$NF=="ok" {print $1}' "$OUT/log" | sort -u | comm -12 - "$OUT/allowed" >"$OUT/stale"

echo "pjdfstest: $(awk '$NF=="ok"' "$OUT/log" | wc -l) passed, $(wc -l <"$OUT/failed") failed" \
  "($(wc -l <"$OUT/unexpected") not allow-listed), $(awk '$NF=="skipped"' "$OUT/log" | wc -l) skipped; log: $OUT/log"
ok=1
if ! grep -q '^Summary:' "$OUT/log"; then
  echo "ERROR: pjdfstest did not finish (rc=$rc$([ $rc = 124 ] && echo ', timeout')); last lines:"; tail -5 "$OUT/log"; ok=0
fi
if [ -s "$OUT/unexpected" ]; then
  echo "UNEXPECTED failures (not in $(basename "$ALLOW")):"
  while read -r t; do  # name + first assertion line after it
    echo "  $t"
    # its message: the following lines up to the next test line (at most 3)
    awk -v t="$t" 'f && (NF==0 || $NF ~ /^(ok|FAILED|skipped)$/ || ++n>3) {exit}
      f {sub(/^[ \t]+/, ""); print "      " substr($0, 1, 200)}  $1==t && $NF=="FAILED" {f=1}' "$OUT/log"
  done <"$OUT/unexpected"
  ok=0
fi
[ -s "$OUT/stale" ] && { echo "NOTE: allow-listed but now passing (remove from the list):"; sed 's/^/  /' "$OUT/stale"; }
[ $ok = 1 ]
