#!/usr/bin/env bash
# Trellis on a real Kubernetes cluster (kind), end to end, for users and CI that have
# Docker: creates a kind cluster (one control plane, two workers), installs the Gateway API
# CRDs, builds and loads the Trellis image, installs the chart, puts a namespace in the
# mesh, deploys sample apps and a waypoint, and checks what a user would:
#   1. the chart's components come up and the control plane publishes the trust bundle;
#   2. traffic between pods on different nodes is mutual TLS (the destination ztunnel's
#      metrics count it with connection_security_policy="mutual_tls", and the call works);
#   3. an L4 AuthorizationPolicy is accepted (condition ZtunnelAccepted) and denies;
#   4. a waypoint deployed with `trellisctl waypoint apply` becomes Programmed with an
#      address, and an L7 policy on it (GET only) refuses a POST with 403.
# Every step fails loudly; nothing is skipped. The cluster is deleted at the end unless
# KEEP_CLUSTER=1.
#
# Needs: docker, kind, kubectl, helm, cargo (for trellisctl). This cannot run in the
# project's CI machine (no Docker engine there); scripts/test-all.sh runs the chart checks
# that can (render, lint, strict validation).
#
# Usage: tests/kind/run.sh            (from the repository root or anywhere)
#   KIND_CLUSTER=name  cluster name (default trellis-e2e)
#   KEEP_CLUSTER=1     keep the cluster afterwards
#   GATEWAY_API_VERSION=v1.2.1
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
cluster=${KIND_CLUSTER:-trellis-e2e}
gateway_api=${GATEWAY_API_VERSION:-v1.2.1}
image_repo=ghcr.io/trellis-mesh/trellis
tag=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}/\1/p' charts/trellis/Chart.yaml)
ns=trellis-system
app_ns=shop

say() { printf '\n== %s\n' "$*"; }
die() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

for tool in docker kind kubectl helm cargo; do
  command -v "$tool" >/dev/null || die "$tool is required (see the header of $0)"
done
docker info >/dev/null 2>&1 || die "the Docker engine is not reachable"

cleanup() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "--- diagnostics"
    kubectl get pods -A -o wide || true
    kubectl -n "$ns" logs deploy/trellis-control-plane --tail=100 || true
    kubectl -n "$ns" logs ds/trellis-ztunnel --tail=100 || true
    kubectl -n "$ns" logs ds/trellis-node-agent --tail=100 || true
  fi
  if [ "${KEEP_CLUSTER:-0}" != 1 ]; then
    kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
  fi
  exit "$rc"
}
trap cleanup EXIT

say "kind cluster $cluster (1 control plane, 2 workers)"
if ! kind get clusters | grep -qx "$cluster"; then
  kind create cluster --name "$cluster" --wait 120s --config - <<'YAML'
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
  - role: worker
  - role: worker
YAML
fi
kubectl config use-context "kind-$cluster" >/dev/null

say "Gateway API CRDs $gateway_api (a prerequisite of the chart)"
kubectl apply --server-side -f "https://github.com/kubernetes-sigs/gateway-api/releases/download/$gateway_api/standard-install.yaml"
kubectl wait --for=condition=Established crd/gateways.gateway.networking.k8s.io --timeout=60s

say "image $image_repo:$tag"
make images IMAGE="$image_repo" TAG="$tag"
kind load docker-image --name "$cluster" "$image_repo:$tag"

say "helm install trellis"
helm upgrade --install trellis charts/trellis -n "$ns" --create-namespace \
  --set image.tag="$tag" --set image.pullPolicy=Never --wait --timeout 5m
kubectl -n "$ns" rollout status deploy/trellis-control-plane --timeout=180s
kubectl -n "$ns" rollout status ds/trellis-node-agent --timeout=180s
kubectl -n "$ns" rollout status ds/trellis-ztunnel --timeout=180s
kubectl -n "$ns" get configmap trellis-ca-root-cert -o jsonpath='{.data.root-cert\.pem}' \
  | grep -q 'BEGIN CERTIFICATE' || die "no trust bundle in ConfigMap $ns/trellis-ca-root-cert"
kubectl -n "$ns" get secret trellis-ca >/dev/null || die "the CA's Secret $ns/trellis-ca was not created"

say "namespace $app_ns in the mesh; sample apps on two nodes"
kubectl create namespace "$app_ns" --dry-run=client -o yaml | kubectl apply -f -
kubectl label namespace "$app_ns" istio.io/dataplane-mode=ambient --overwrite
read -r -a workers <<<"$(kubectl get nodes -l '!node-role.kubernetes.io/control-plane' -o jsonpath='{.items[*].metadata.name}')"
[ "${#workers[@]}" -ge 2 ] || die "expected two worker nodes, found: ${workers[*]:-none}"
kubectl apply -f - <<YAML
apiVersion: v1
kind: ServiceAccount
metadata: {name: server, namespace: $app_ns}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: $app_ns}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: server, namespace: $app_ns}
spec:
  selector: {matchLabels: {app: server}}
  template:
    metadata: {labels: {app: server}}
    spec:
      serviceAccountName: server
      nodeName: ${workers[0]}
      containers:
        - name: server
          image: $image_repo:$tag
          imagePullPolicy: Never
          command: [trellis-testapp, serve, --tcp-echo, 0.0.0.0:9000, --http, 0.0.0.0:8080]
          env: [{name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}]
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: $app_ns}
spec:
  selector: {app: server}
  ports:
    - {name: tcp-echo, port: 9000}
    - {name: http, port: 8080}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: client, namespace: $app_ns}
spec:
  selector: {matchLabels: {app: client}}
  template:
    metadata: {labels: {app: client}}
    spec:
      serviceAccountName: client
      nodeName: ${workers[1]}
      containers:
        - name: client
          image: $image_repo:$tag
          imagePullPolicy: Never
          command: [sleep, infinity]
YAML
kubectl -n "$app_ns" rollout status deploy/server --timeout=120s
kubectl -n "$app_ns" rollout status deploy/client --timeout=120s
vip=$(kubectl -n "$app_ns" get svc server -o jsonpath='{.spec.clusterIP}')

call_tcp() { kubectl -n "$app_ns" exec deploy/client -- trellis-testapp tcp "$vip:9000" --message "$1" --timeout 5; }
retry() {
  local what=$1; shift
  for _ in $(seq 1 30); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 2
  done
  die "$what"
}

say "traffic between the nodes is mutual TLS"
retry "client -> server over the mesh" call_tcp "hello-over-hbone"
server_node=$(kubectl -n "$app_ns" get pod -l app=server -o jsonpath='{.items[0].spec.nodeName}')
ztunnel=$(kubectl -n "$ns" get pod -l app.kubernetes.io/name=trellis-ztunnel \
  --field-selector "spec.nodeName=$server_node" -o jsonpath='{.items[0].metadata.name}')
metrics=$(kubectl get --raw "/api/v1/namespaces/$ns/pods/$ztunnel:15020/proxy/metrics")
echo "$metrics" | grep 'istio_tcp_connections_opened_total' \
  | grep 'reporter="destination"' \
  | grep 'source_principal="spiffe://cluster.local/ns/shop/sa/client"' \
  | grep -q 'connection_security_policy="mutual_tls"' \
  || die "the destination ztunnel ($ztunnel) did not count a mutual-TLS connection from shop/client"
echo "ok: $ztunnel counted shop/client -> shop/server as mutual_tls"

say "an L4 AuthorizationPolicy: accepted, and it denies"
kubectl apply -f - <<YAML
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: $app_ns}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules: [{from: [{source: {principals: ["cluster.local/ns/$app_ns/sa/client"]}}]}]
YAML
kubectl -n "$app_ns" wait authorizationpolicy/deny-client --for=condition=ZtunnelAccepted --timeout=60s
denied() { ! call_tcp "should-be-denied"; }
retry "the DENY policy takes effect" denied
kubectl -n "$app_ns" delete authorizationpolicy deny-client
retry "the call works again once the policy is deleted" call_tcp "allowed-again"
echo "ok: denied while the policy existed, allowed after"

say "a waypoint, and an L7 policy on it"
cargo run -q --release -p trellisctl -- waypoint apply -n "$app_ns" --enroll-namespace --wait --timeout 180
kubectl -n "$app_ns" get gateway waypoint -o jsonpath='{.status.addresses[0].value}' | grep -q . \
  || die "the waypoint Gateway has no address in its status"
kubectl apply -f - <<YAML
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-only, namespace: $app_ns}
spec:
  targetRefs: [{kind: Service, group: "", name: server}]
  action: ALLOW
  rules: [{to: [{operation: {methods: ["GET"]}}]}]
YAML
http() { kubectl -n "$app_ns" exec deploy/client -- trellis-testapp http "http://$vip:8080/" --method "$1" --expect-status "$2" --timeout 5; }
retry "GET through the waypoint is allowed" http GET 200
retry "POST through the waypoint is refused with 403" http POST 403
echo "ok: the waypoint enforces the L7 policy"

say "all checks passed"
