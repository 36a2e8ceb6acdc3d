#!/usr/bin/env bash
# quickstart.sh [EXPORT_DIR] [MOUNTPOINT]: install what braid needs, build it, export
# EXPORT_DIR (default /srv/braid-export) with `braid serve` on 127.0.0.1:7700 in the
# background over TLS with client certificates (made by `braid init` in /etc/braid), and mount
# it on MOUNTPOINT (default /mnt/braid). Run as root on Debian 12.
# Stop with: braid umount MOUNTPOINT; kill "$(cat /run/braid-serve.pid)"
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export_dir=${1:-/srv/braid-export}
mountpoint=${2:-/mnt/braid}
addr=127.0.0.1:7700

scripts/install-deps.sh --runtime
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
cargo build --release --quiet
install -m 755 target/release/braid /usr/local/bin/braid

# Credentials (a private CA, server and client certificates) in /etc/braid, made once: the
# server accepts only clients holding a certificate of this authority, over TLS 1.3.
[ -f /etc/braid/ca.pem ] || braid init
mkdir -p "$export_dir" "$mountpoint"
# --no-root-squash: server and mount are on this one machine, and you are root on both; a
# server for other machines should keep the default (remote root acts as nobody).
braid serve --data "$export_dir" --listen "$addr" --no-root-squash >>/var/log/braid-serve.log 2>&1 &
echo $! > /run/braid-serve.pid
for _ in $(seq 1 50); do
  (exec 3<>"/dev/tcp/${addr%:*}/${addr#*:}") 2>/dev/null && break
  sleep 0.1
done
braid mount "$addr" "$mountpoint" --log-file /var/log/braid-mount.log
echo "braid: $export_dir is mounted on $mountpoint (server log /var/log/braid-serve.log)"
