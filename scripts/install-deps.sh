#!/usr/bin/env bash
# install-deps.sh: idempotent setup of everything the test/bench scripts need, for a fresh
# Debian 12 machine running as root. Safe to re-run: installs only what is missing.
#   apt:   fuse3 libfuse3-dev pkg-config (build of the FUSE client), bindfs fio postmark (bench peers and
#          workloads), attr (xattr tools), python3 (bench helpers, fsx probe, the sqlite test), git (the git
#          workload test), stress-ng dbench (the stress stage), util-linux (mountpoint,
#          fallocate, findmnt), passwd (useradd for the pjdfstest user), build-essential (cc for cargo install).
#   cargo: pjdfstest, fsx (conformance suites) and cargo-fuzz, installed into ~/.cargo/bin, which CI
#          may cache.
# --runtime: only what building and running braid needs (FUSE, a C compiler, Rust), no test tools.
set -euo pipefail
runtime_only=false
[ "${1:-}" = --runtime ] && runtime_only=true

die() { echo "install-deps: ERROR: $*" >&2; exit 1; }
say() { echo "install-deps: $*"; }
[ "$(id -u)" = 0 ] || die "must run as root (apt-get, and the suites need root anyway)"

APT_PKGS=(fuse3 pkg-config util-linux build-essential curl ca-certificates)
$runtime_only || APT_PKGS+=(libfuse3-dev bindfs fio postmark attr python3 passwd procps git stress-ng dbench)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "apt-get install ${missing[*]}"
  # Another apt/dpkg (e.g. unattended-upgrades, a parallel job) may hold the lock: wait for it
  # (up to 10 min) instead of failing.
  export DEBIAN_FRONTEND=noninteractive
  apt=(apt-get -o DPkg::Lock::Timeout=600 -qq)
  log=$(mktemp)
  if ! "${apt[@]}" update >"$log" 2>&1 || ! "${apt[@]}" install -y --no-install-recommends "${missing[@]}" >>"$log" 2>&1; then
    tail -20 "$log" >&2; rm -f "$log"; die "apt-get install failed for: ${missing[*]}"
  fi
  rm -f "$log"
fi

# cargo-installed suites: ~/.cargo/bin is the cache between CI runs, so only build when absent.
CARGO_BIN=${CARGO_HOME:-$HOME/.cargo}/bin
export PATH="$CARGO_BIN:$PATH"
if ! command -v cargo >/dev/null; then
  # Debian 12's own cargo is too old for braid's dependencies: use rustup's stable toolchain.
  say "installing the Rust toolchain with rustup"
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal >/dev/null \
    || die "rustup install failed (no network?); install a Rust toolchain >= 1.85 and re-run"
fi
for crate in pjdfstest fsx cargo-fuzz; do
  if $runtime_only || [ -x "$CARGO_BIN/$crate" ]; then continue; fi
  say "cargo install --locked $crate (a few minutes)"
  log=$(mktemp)
  if ! cargo install --locked --quiet "$crate" >"$log" 2>&1; then
    tail -30 "$log" >&2; rm -f "$log"; die "cargo install $crate failed"
  fi
  rm -f "$log"
done

# FUSE needs /dev/fuse; without it nothing mounts (e.g. an unprivileged container).
[ -c /dev/fuse ] || die "/dev/fuse missing (load the fuse module or run the container with --device /dev/fuse)"
if $runtime_only; then say "ok (apt: ${#APT_PKGS[@]} packages present; cargo in $CARGO_BIN)"; else say "ok (apt: ${#APT_PKGS[@]} packages present; pjdfstest, fsx, cargo-fuzz in $CARGO_BIN)"; fi
