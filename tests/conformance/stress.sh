#!/usr/bin/env bash
# stress.sh: concurrency stress on two clients of one server (run under
# SECOND_MOUNT=1 tests/e2e/with-mount.sh, which sets BRAID_MNT and BRAID_MNT2).
#   stress-ng : the file-system stressors (the shared lab's list), one at a time, 2 workers,
#               --verify, STRESS_T seconds each, alternately on each mount. A stressor that
#               does not end within STRESS_T + 60 s is a hang, and a failure: processes stuck
#               in a network file system are what users hate most.
#   dbench    : the Samba NetBench load (create/write/read/rename/unlink/lock), one instance
#               on each mount at once, 2 processes each; any failed operation fails
#   fio       : random writes of 512 B - 64 KiB then a crc32c verify, psync and mmap engines
# Exit 1 if anything fails; logs in STRESS_OUT (default: a temp dir).
# Env: STRESS_T (4), STRESSORS (override the list), DBENCH_T (20), FIO_SIZE (64m per job).
set -uo pipefail
: "${BRAID_MNT:?run under tests/e2e/with-mount.sh}" "${BRAID_MNT2:?run with SECOND_MOUNT=1}"
OUT=${STRESS_OUT:-$(mktemp -d /tmp/stress.XXXXXX)}
T=${STRESS_T:-4}
DBENCH_T=${DBENCH_T:-20}
FIO_SIZE=${FIO_SIZE:-64m}
# Left out, as in the lab: stressors that are not about the file system under test or need
# what a FUSE mount cannot give (bind mounts, verity, ext ioctls, global sync).
STRESSORS=${STRESSORS:-access chdir chmod chown copy-file dentry dir dirdeep dirmany dnotify fallocate fanotify fcntl fiemap file-ioctl filename flock fpunch fsize getdent hdd inode-flags inotify iomix lease link locka lockf lockofd mknod mmap readahead rename seek symlink sync-file touch utime xattr aio}
mkdir -p "$OUT"
failed=()

stress_ng() {
  local mounts=("$BRAID_MNT" "$BRAID_MNT2") i=0 s rc extra
  for s in $STRESSORS; do
    local dir=${mounts[$((i % 2))]}/stress-ng/$s; i=$((i + 1))
    mkdir -p "$dir"
    extra=()
    [ "$s" = mmap ] && extra=(--mmap-file)
    [ "$s" = hdd ] && extra=(--hdd-bytes 64M)
    timeout -k 10 $((T + 60)) stress-ng --temp-path "$dir" --verify --timeout "$T" --"$s" 2 "${extra[@]}" \
      >"$OUT/stress-ng.$s.log" 2>&1
    rc=$?
    case $rc in
      0) echo "stress-ng $s: ok";;
      3|4) echo "stress-ng $s: skipped (unsupported here, rc=$rc)";;
      124|137) echo "stress-ng $s: HANG"; failed+=("stress-ng $s (hang)");;
      *) echo "stress-ng $s: FAIL (rc=$rc)"; tail -5 "$OUT/stress-ng.$s.log"; failed+=("stress-ng $s");;
    esac
    rm -rf "$dir"
  done
}

dbench_both() {
  local pids=() i rc log
  for i in 1 2; do
    local mnt=$BRAID_MNT; [ "$i" = 2 ] && mnt=$BRAID_MNT2
    mkdir -p "$mnt/dbench$i"
    timeout -k 10 $((DBENCH_T + 180)) dbench -D "$mnt/dbench$i" -t "$DBENCH_T" 2 >"$OUT/dbench$i.log" 2>&1 &
    pids+=($!)
  done
  for i in 1 2; do
    wait "${pids[$((i - 1))]}"; rc=$?
    log=$OUT/dbench$i.log
    # dbench falls back to another barrier when SysV semaphores are short; that line is no
    # file-system error.
    if [ $rc = 0 ] && grep -q '^Throughput' "$log" && ! grep -v 'barrier semaphore' "$log" | grep -qiE 'failed|error|expected'; then
      echo "dbench on mount $i: ok, $(grep '^Throughput' "$log")"
    else
      echo "dbench on mount $i: FAIL (rc=$rc)"; grep -iE 'failed|error|expected' "$log" | sort | uniq -c | head -5
      failed+=("dbench $i")
    fi
  done
  rm -rf "$BRAID_MNT/dbench1" "$BRAID_MNT/dbench2"
}

fio_verify() {
  local engine rc dir=$BRAID_MNT/fio
  for engine in psync mmap; do
    mkdir -p "$dir"
    timeout -k 10 300 fio --name="verify-$engine" --directory="$dir" --ioengine="$engine" --rw=randwrite \
      --bsrange=512-64k --size="$FIO_SIZE" --numjobs=2 --verify=crc32c --do_verify=1 --verify_fatal=1 \
      --fsync_on_close=1 --verify_state_save=0 --group_reporting >"$OUT/fio.$engine.log" 2>&1
    rc=$?
    if [ $rc = 0 ] && ! grep -qiE 'verify: bad|verify failed|bad magic|err= *[1-9]' "$OUT/fio.$engine.log"; then
      echo "fio verify $engine: ok"
    else
      echo "fio verify $engine: FAIL (rc=$rc)"; failed+=("fio $engine")
    fi
    rm -rf "$dir"
  done
}

stress_ng
dbench_both
fio_verify
if [ ${#failed[@]} -gt 0 ]; then
  echo "stress: ${#failed[@]} failed: ${failed[*]} (logs in $OUT)"; exit 1
fi
echo "stress: all passed (logs in $OUT)"
