#!/usr/bin/env bash
# scripts/test.sh: the whole CI run, stage by stage, failing fast with the stage name:
#   deps      scripts/install-deps.sh (apt packages, pjdfstest, fsx)
#   build     cargo build --release --workspace
#   lint      cargo fmt --check, cargo clippy -D warnings
#   test      cargo test --release --workspace            (unit + integration tests)
#   pjdfstest tests/conformance/pjdfstest.sh on a fresh braid mount (tests/e2e/with-mount.sh)
#   fsx       tests/conformance/fsx.sh on a fresh braid mount while a second client reads the files
#   coherence tests/conformance/fscheck.sh: the lab's checks on one mount and across two
#   stress    tests/conformance/stress.sh: stress-ng's file-system stressors, dbench on both
#             mounts at once, fio write+verify (two clients; a hang is a failure)
#   crash     tests/crash/run.sh maildir_crash.py (maildir delivery across server kills),
#             tests/crash/run.sh power_cut.py (an emulated power cut of the server's machine) and
#             tests/crash/fsx-kill.sh (fsx across server kills); each manages its own server/mount
#   fuzz      scripts/fuzz.sh: the frame and message decoders under libFuzzer, FUZZ_SECONDS each
# Prints PASS/FAIL/SKIP and seconds per stage, and a summary. Budget: ~30 min on 2 cores.
# Env: STAGES (subset, e.g. "build pjdfstest"), TEST_OUT (dir for suite logs), plus what the
# scripts read (BRAID, FSX_OPS, FSX_TIMEOUT, PJDFS_TIMEOUT, NAPTIME, ...).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
export TEST_OUT=${TEST_OUT:-/tmp/braid-test-$(date +%Y%m%d-%H%M%S)}
export PJDFS_OUT=$TEST_OUT/pjdfstest FSX_OUT=$TEST_OUT/fsx STRESS_OUT=$TEST_OUT/stress
# keep the worst case inside the budget: pjdfstest takes seconds, fsx a few minutes per variant
export PJDFS_TIMEOUT=${PJDFS_TIMEOUT:-600} FSX_TIMEOUT=${FSX_TIMEOUT:-600}
STAGES=${STAGES:-deps build lint test pjdfstest fsx coherence stress crash fuzz}
summary=()

finish() {
  echo; echo "==================== summary (logs: $TEST_OUT)"
  printf '  %s\n' "${summary[@]}"
}
stage() {  # stage NAME CMD...: run, record PASS/FAIL, stop everything on failure
  local name=$1 t0=$SECONDS rc; shift
  [[ " $STAGES " == *" $name "* ]] || return 0
  echo; echo "==================== stage $name: $*"
  "$@"; rc=$?
  if [ $rc = 0 ]; then
    summary+=("PASS  $name ($((SECONDS - t0))s)"); echo "---- PASS $name ($((SECONDS - t0))s)"
  else
    summary+=("FAIL  $name ($((SECONDS - t0))s, exit $rc)"); echo "---- FAIL $name (exit $rc)"
    finish; echo "FAILED at stage: $name"; exit 1
  fi
}
mkdir -p "$TEST_OUT"

stage deps scripts/install-deps.sh
stage build cargo build --release --workspace
stage lint bash -c 'cargo fmt --all --check && cargo clippy --release --workspace --all-targets --quiet -- -D warnings'
stage test cargo test --release --workspace
stage pjdfstest tests/e2e/with-mount.sh tests/conformance/pjdfstest.sh
stage fsx env SECOND_MOUNT=1 tests/e2e/with-mount.sh tests/conformance/fsx-with-reader.sh
stage coherence env SECOND_MOUNT=1 tests/e2e/with-mount.sh tests/conformance/fscheck.sh
stage stress env SECOND_MOUNT=1 tests/e2e/with-mount.sh tests/conformance/stress.sh
stage crash bash -c 'tests/crash/run.sh maildir_crash.py && tests/crash/run.sh power_cut.py && tests/crash/fsx-kill.sh'
stage fuzz scripts/fuzz.sh "${FUZZ_SECONDS:-20}"
finish; echo "ALL PASSED"
