#!/usr/bin/env bash
# fuzz.sh [SECONDS]: run each fuzz target (fuzz/fuzz_targets: the frame decoder and the message
# decoders) for SECONDS (default 60) on its corpus in fuzz/corpus, with libFuzzer via cargo fuzz.
# A crash fails the run and leaves its input in fuzz/artifacts/<target>/. New interesting inputs
# are added to the corpus; commit them after `cargo fuzz cmin <target>` if they are worth keeping.
# cargo fuzz needs nightly features; RUSTC_BOOTSTRAP=1 enables them on the stable toolchain.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"
seconds=${1:-60}
export RUSTC_BOOTSTRAP=1 PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
command -v cargo-fuzz >/dev/null || { echo "fuzz.sh: cargo-fuzz missing (scripts/install-deps.sh installs it)" >&2; exit 2; }
for target in frame message; do
  mkdir -p "corpus/$target"
  echo "fuzz.sh: $target for ${seconds}s"
  # -max_len bounds inputs to what a message may hold in practice; -timeout flags hangs.
  cargo fuzz run --release "$target" "corpus/$target" -- -max_total_time="$seconds" -max_len=4096 -timeout=10 2>&1 | tail -2
done
