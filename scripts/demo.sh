#!/usr/bin/env bash
# The local demo: a two-node Trellis mesh on Linux network namespaces, walked through with
# real traffic (mTLS on the wire, an AuthorizationPolicy that denies and is lifted), then
# torn down. Run as root on a Debian/Ubuntu machine with a Rust toolchain:
#   sudo ./scripts/demo.sh          # walk through, then clean up
#   sudo ./scripts/demo.sh --wait   # keep the mesh up until Ctrl-C
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "demo: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || fail "run as root: the demo creates network namespaces (sudo ./scripts/demo.sh)"

need=()
command -v ip >/dev/null       || need+=(iproute2)
command -v nft >/dev/null      || need+=(nftables)
command -v nsenter >/dev/null  || need+=(util-linux)
command -v tcpdump >/dev/null  || need+=(tcpdump)
command -v cc >/dev/null       || need+=(gcc)
[ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ] || need+=(containernetworking-plugins)
if [ ${#need[@]} -gt 0 ]; then
  echo "demo: installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
command -v cargo >/dev/null || fail "cargo not found: install a Rust toolchain (1.95 or newer)"

echo "demo: building Trellis (first time: a few minutes)"
cargo build --workspace --bins --quiet
exec target/debug/trellisctl demo "$@"
