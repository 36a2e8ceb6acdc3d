#!/usr/bin/env bash
# fsx-with-reader.sh: fsx.sh on the first mount while the second client reads the same files
# without pause (run under SECOND_MOUNT=1 tests/e2e/with-mount.sh). Every write of fsx must
# recall the reader's cached pages and attributes, and fsx checks every byte it reads back.
# The reader counts its reads; a run in which it never read an fsx file fails, since it then
# tested nothing.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${BRAID_MNT:?run under tests/e2e/with-mount.sh}" "${BRAID_MNT2:?run with SECOND_MOUNT=1}"
stop=$(mktemp /tmp/fsx-reader.XXXXXX) count=$stop.count
echo 0 >"$count"
(
  n=0
  while [ -e "$stop" ]; do
    before=$n
    for f in "$BRAID_MNT2"/fsx.*; do
      [ -f "$f" ] && cat "$f" >/dev/null 2>&1 && n=$((n + 1))
    done
    echo "$n" >"$count"
    [ "$n" != "$before" ] || sleep 0.05   # between fsx variants: no file yet
  done
) &
reader=$!
"$HERE/fsx.sh" "$BRAID_MNT"
rc=$?
rm -f "$stop"; wait "$reader"
reads=$(cat "$count"); rm -f "$count"
echo "fsx-with-reader: the second client read the fsx files $reads times"
[ "$reads" -gt 0 ] || { echo "fsx-with-reader: the reader never read an fsx file"; exit 1; }
exit "$rc"
