#!/usr/bin/env bash
# Runs every Trellis test: formatting and lints, unit, integration and end-to-end tests
# (network-namespace cluster, real CNI plugins). Needs root; installs the OS packages it
# needs when they are missing. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "test-all: $*" >&2; exit 1; }

if [ "$(id -u)" -ne 0 ]; then
  fail "must run as root: the end-to-end tests create network namespaces, veth links and
run CNI plugins. Run: sudo $0   (the end-to-end tests are never skipped)"
fi

# OS packages: what the tests run (ip, sysctl, the CNI reference plugins), what the node
# agent uses for capture (nft, nsenter), curl (the tests scrape ztunnel's metrics) and
# tcpdump (the demo, run by a test, captures the wire).
need=()
command -v ip >/dev/null        || need+=(iproute2)
command -v sysctl >/dev/null    || need+=(procps)
command -v iptables >/dev/null  || need+=(iptables)
command -v nft >/dev/null       || need+=(nftables)
[ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ] || need+=(containernetworking-plugins)
command -v nsenter >/dev/null   || need+=(util-linux)
command -v curl >/dev/null      || need+=(curl)
command -v tcpdump >/dev/null   || need+=(tcpdump)
command -v cc >/dev/null        || need+=(gcc)
# The kind script cannot run here (no Docker engine); it is at least statically checked.
command -v shellcheck >/dev/null || need+=(shellcheck)
# The Helm chart checks run in a Python virtual environment (PyPI helm-python-sdk and
# kubernetes-validate).
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  echo "test-all: installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

command -v cargo >/dev/null || fail "cargo not found: install a Rust toolchain (1.95 or newer)"
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "test-all: installing cargo-nextest"
  cargo install cargo-nextest --locked
fi
if ! cargo deny --version >/dev/null 2>&1; then
  echo "test-all: installing cargo-deny"
  cargo install cargo-deny --locked
fi
for c in clippy rustfmt; do
  if ! cargo "${c/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$c" || fail "cargo $c is missing and could not be installed"
  fi
done

# Logs of failed end-to-end tests stay here (the failure message prints the path).
export TRELLIS_E2E_LOG_DIR="${TRELLIS_E2E_LOG_DIR:-$PWD/target/e2e-logs}"

# Nothing of ours may outlive the run, also when tests fail (that is when leaks happen).
leak_check() {
  local status=$?
  left=$(ip netns list | awk '{print $1}' | grep -E '^trl-[0-9a-f]{6}-' || true)
  if [ -n "$left" ]; then
    echo "test-all: network namespaces left behind: $left" >&2
    status=1
  fi
  if [ -d /run/trellis-e2e ] && [ -n "$(ls -A /run/trellis-e2e)" ]; then
    echo "test-all: cluster state left behind in /run/trellis-e2e: $(ls /run/trellis-e2e)" >&2
    status=1
  fi
  [ $status -eq 0 ] && echo "test-all: all tests passed"
  exit $status
}
trap leak_check EXIT

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== binaries (the end-to-end tests and the demo test run them)"
# cargo builds a package's binaries for its own integration tests only; trellisctl has none.
cargo build --workspace --bins --locked
echo "== supply chain: cargo deny (licenses, bans, sources; offline — deny.toml)"
cargo deny --offline check licenses bans sources
echo "== tests (unit, integration, end-to-end)"
cargo nextest run --workspace --all-targets --locked --no-fail-fast
echo "== doc tests"
cargo test --workspace --doc --locked
echo "== Helm chart: render and lint (Helm engine), validate (Kubernetes 1.30, strict; CRD kinds against their CRD schemas with CEL), the control plane's writes"
venv=target/chart-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import helm_python, kubernetes_validate, jsonschema, yaml, celpy' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r tests/chart/requirements.txt
fi
"$venv/bin/python" tests/chart/check.py
echo "== shell scripts (shellcheck), the kind end-to-end script among them"
shellcheck tests/kind/run.sh scripts/*.sh
