#!/usr/bin/env bash
# usage: tests/crash/run.sh TEST.py
# Runs one crash test (maildir_crash.py, power_cut.py) against the release binary in a fresh
# work directory, removed afterwards unless the test fails.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
braid=${BRAID:-$here/../../target/release/braid}
test=${1:?usage: run.sh TEST.py}
work=$(mktemp -d /tmp/braid-crash.XXXXXX)
if python3 "$here/$test" "$braid" "$work"; then
  rm -rf "$work"
else
  echo "crash test $test failed; logs and data kept in $work" >&2
  exit 1
fi
