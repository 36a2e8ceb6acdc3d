#!/usr/bin/env bash
# fscheck.sh: the lab's semantic checks on two clients of one server (run under
# SECOND_MOUNT=1 tests/e2e/with-mount.sh, which sets BRAID_MNT and BRAID_MNT2).
#   single    : locks, O_APPEND, unlink/rename while open, xattrs... on the first mount
#   coherency : the same directory seen through both mounts, with FSCHECK_WAIT=0: a change on
#               one client must be visible on the other at once, not after a cache timeout
# fscheck.py is vendored from the shared lab (../shared/lab/conformance). Exit 1 if any check
# fails, core or strict tier (braid passes both).
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${BRAID_MNT:?run under tests/e2e/with-mount.sh}" "${BRAID_MNT2:?run with SECOND_MOUNT=1}"
OUT=${FSCHECK_OUT:-$(mktemp -d /tmp/fscheck.XXXXXX)}
mkdir -p "$OUT" "$BRAID_MNT/single" "$BRAID_MNT/both"
export FSCHECK_WAIT=${FSCHECK_WAIT:-0}
python3 "$HERE/fscheck.py" single "$BRAID_MNT/single" >"$OUT/single.log" 2>&1
python3 "$HERE/fscheck.py" coherency "$BRAID_MNT/both" "$BRAID_MNT2/both" >"$OUT/coherency.log" 2>&1
tail -qn1 "$OUT/single.log" "$OUT/coherency.log"
if grep -h '^FAIL' "$OUT/single.log" "$OUT/coherency.log"; then
  echo "fscheck: failures above (logs in $OUT)"; exit 1
fi
grep -q 'passed' "$OUT/coherency.log" || { echo "fscheck: coherency did not finish (log: $OUT/coherency.log)"; exit 1; }
