#!/usr/bin/env bash
# fsx.sh [MOUNTDIR]   (default: $BRAID_MNT, as set by tests/e2e/with-mount.sh)
#
# Data-integrity check: runs fsx (`cargo install fsx`) on a file in MOUNTDIR, fixed seed, in three
# variants, one vendored config each: mmap (classic mix incl. mmap read/write), nommap (no mmap),
# ext (nommap + fallocate, punch-hole, sendfile, fadvise, copy_file_range). fsx checks every read
# against its model. Exit 1 if any variant fails or times out.
# fsx fails on an unsupported posix_fallocate and panics on an unsupported punch-hole, so 'ext'
# probes both first and disables what the FS lacks (printed as NOTE) to still check the rest.
#
# Env: FSX_OPS (default 100000), FSX_SEED (1), FSX_VARIANTS ("mmap nommap ext"),
#      FSX_TIMEOUT (s per variant, default 600), FSX_OUT (artifact dir, default a new /tmp dir), FSX (binary)
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=${1:-${BRAID_MNT:-}}
if [ -z "$DIR" ] || ! DIR=$(cd "$DIR" 2>/dev/null && pwd); then echo "usage: fsx.sh MOUNTDIR" >&2; exit 2; fi
OUT=${FSX_OUT:-$(mktemp -d /tmp/fsx.XXXXXX)}
OPS=${FSX_OPS:-100000}; SEED=${FSX_SEED:-1}
FSX=${FSX:-$(command -v fsx || echo "$HOME/.cargo/bin/fsx")}
[ -x "$FSX" ] || { echo "fsx not found (scripts/install-deps.sh)" >&2; exit 2; }
mkdir -p "$OUT"

nfail=0
for v in ${FSX_VARIANTS:-mmap nommap ext}; do
  cfg=$HERE/fsx-$v.toml; note=""
  [ -f "$cfg" ] || { echo "no config $cfg" >&2; exit 2; }
  if [ "$v" = ext ]; then
    probe=$DIR/fsx.probe.$$; sed_args=()
    head -c 8192 /dev/zero >"$probe"
    python3 -c 'import os,sys; os.posix_fallocate(os.open(sys.argv[1], os.O_RDWR), 0, 65536)' "$probe" 2>/dev/null ||
      { sed_args+=(-e 's/^posix_fallocate *=.*/posix_fallocate = 0/'); note+=" posix_fallocate-unsupported(disabled)"; }
    fallocate -p -o 0 -l 4096 "$probe" 2>/dev/null ||
      { sed_args+=(-e 's/^punch_hole *=.*/punch_hole = 0/'); note+=" punch_hole-unsupported(disabled)"; }
    rm -f "$probe"
    if [ ${#sed_args[@]} -gt 0 ]; then sed "${sed_args[@]}" "$cfg" >"$OUT/fsx-ext.effective.toml"; cfg=$OUT/fsx-ext.effective.toml; fi
  fi
  f=$DIR/fsx.$v.$$; t0=$SECONDS
  # -q: only errors and the verdict; on failure fsx writes FILE.fsxgood/.fsxlog to -P and dumps its op log.
  RUST_BACKTRACE=1 timeout -k 10 "${FSX_TIMEOUT:-600}" "$FSX" -q -N "$OPS" -S "$SEED" -f "$cfg" -P "$OUT" "$f" >"$OUT/fsx.$v.log" 2>&1
  rc=$?
  if [ $rc = 0 ] && grep -q 'All operations completed A-OK' "$OUT/fsx.$v.log"; then verdict=ok
  elif [ $rc = 124 ] || [ $rc = 137 ]; then verdict=TIMEOUT
  else verdict="FAIL(rc=$rc)"; cp -f "$f" "$OUT/" 2>/dev/null; fi
  rm -f "$f"
  echo "fsx[$v]: $verdict ($OPS ops, seed $SEED, $((SECONDS - t0))s)${note:+ NOTE:$note}"
  if [ "$verdict" != ok ]; then
    nfail=$((nfail + 1))
    grep -iE 'error|fail|unexpected|panick|not support|mismatch|bad data' "$OUT/fsx.$v.log" | head -5 | sed 's/^/    /'
    echo "    log: $OUT/fsx.$v.log"
  fi
done
[ $nfail = 0 ]
