#!/usr/bin/env bash
# Runs the maildir crash test (maildir_crash.py) against the release binary in a fresh
# work directory, removed afterwards unless the test fails.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
braid=${BRAID:-$here/../../target/release/braid}
work=$(mktemp -d /tmp/braid-crash.XXXXXX)
if python3 "$here/maildir_crash.py" "$braid" "$work"; then
  rm -rf "$work"
else
  echo "crash test failed; logs and data kept in $work" >&2
  exit 1
fi
