#!/usr/bin/env python3
"""Checks the Helm chart charts/trellis without a cluster or a helm binary.

- Renders it with the Helm engine (PyPI helm-python-sdk, Helm's Go SDK over a C ABI) for the
  default values and two non-default value sets, and lints it (strict, Kubernetes 1.30).
- Validates every rendered object: built-in kinds with kubernetes-validate --strict against
  Kubernetes 1.30; kinds defined by a CRD (the Gateway API's GatewayClass) against that CRD's
  schema, CEL rules included (crdschema.py): the chart's own security.istio.io CRDs, and the
  Gateway API standard CRDs of the version docs/install.md names (tests/chart/crds/). The
  GatewayClass description that once made `helm install` fail is refused by the check.
- Checks that the values schema rejects wrong values, and that the security.istio.io CRD
  schemas accept the seed articles' example policies (examples/) and reject a misspelled
  field, as the API server's strict field validation would.
- Validates the same way the manifests in tests/chart/manifests/ and what the control
  plane would write for them (`trellis-control-plane render`: waypoint ServiceAccount,
  Service, Deployment, Gateway, route and policy statuses, trust-bundle ConfigMaps), and
  the Gateway `trellisctl waypoint generate` prints.

Exit status 0 when everything holds; otherwise each failure is printed and the status is 1.
"""

import copy
import pathlib
import subprocess
import sys
import tempfile

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

import crdschema


class _JsonLikeLoader(yaml.SafeLoader):
    """YAML as the API server reads it: a timestamp is a string, not a datetime."""


_JsonLikeLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:timestamp"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.copy().items()
}


def load_all(text):
    return [d for d in yaml.load_all(text, Loader=_JsonLikeLoader) if d]

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "trellis"
GATEWAY_API_CRDS = pathlib.Path(__file__).resolve().parent / "crds" / "gateway-api"
MANIFESTS = pathlib.Path(__file__).resolve().parent / "manifests"
BIN = ROOT / "target" / "debug"
# The description the GatewayClass had when the API server refused the chart (issue 20):
# 71 bytes, the Gateway API allows 64.
OLD_GATEWAYCLASS_DESCRIPTION = "Trellis waypoint proxies (L7 policy and routing for ambient workloads)"
KUBE = "1.30.0"
NAMESPACE = "trellis-system"

VALUE_SETS = {
    "defaults": {},
    # Istio's base chart already there; no GatewayClass; fail open; pinned tag, 3 replicas.
    "with-istio-base": {
        "crds": {"install": False},
        "waypoint": {"gatewayClass": {"create": False}},
        "nodeAgent": {"failOpen": True},
        "image": {"tag": "0.1.0-dev", "pullPolicy": "Always"},
        "controlPlane": {"replicas": 3},
    },
    # A single-replica lab install with text logs, other CNI paths, a pull secret.
    "lab": {
        "controlPlane": {"replicas": 1, "podDisruptionBudget": {"enabled": False},
                         "logFormat": "text", "nodeSelector": {"kubernetes.io/os": "linux"}},
        "ztunnel": {"workerThreads": 4, "drainSeconds": 30, "logFormat": "text"},
        "nodeAgent": {"cniBinDir": "/usr/libexec/cni", "cniConfDir": "/etc/cni/conf.d"},
        "imagePullSecrets": [{"name": "registry"}],
        "mesh": {"trustDomain": "cluster.local", "clusterId": "Kubernetes",
                 "tracing": {"service": "otel.observability.svc.cluster.local", "sampling": 0}},
    },
}

failures = []


def fail(msg):
    failures.append(msg)
    print(f"FAIL: {msg}")


def render(chart, values):
    out = chart.render(values, name="trellis", namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if not path.endswith(".yaml"):
            continue
        for doc in load_all(text):
            docs.append((path, doc))
    return docs, out


def gateway_api_crds():
    """The Gateway API CRDs kept as test data, each with the file it came from."""
    crds = []
    for f in sorted(GATEWAY_API_CRDS.glob("*.yaml")):
        for doc in load_all(f.read_text()):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                crds.append((f"{f.parent.name}/{f.name}", doc))
    return crds


def validate(doc, schemas):
    """Why the API server would refuse `doc` (a list of reasons; empty when it accepts it)."""
    if schemas.covers(doc):
        return schemas.validate(doc)
    try:
        kubernetes_validate.validate(doc, KUBE, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{e.message} at {'/'.join(map(str, e.path))}"]
    except Exception as e:  # noqa: BLE001 - an unknown kind is a failure here too
        return [str(e)]
    return []


# The fields of the control plane's WaypointTemplate (control-plane/src/controller/
# waypoint.rs, which refuses unknown ones): the rendered file must fit it.
WAYPOINT_REQUIRED = {"image", "controlPlane", "trustDomain"}
WAYPOINT_KNOWN = WAYPOINT_REQUIRED | {"imagePullPolicy", "imagePullSecrets", "resources",
                                      "logLevel", "tokenAudience"}


def check_waypoint_template(by_kind, values):
    """The waypoint template the chart gives the control plane: parses, has the fields the
    control plane requires and no others, and carries the chart's image and pull secrets."""
    mesh = [d for d in by_kind.get("ConfigMap", []) if d["metadata"]["name"] == "trellis-mesh"]
    if not mesh or "waypoint.yaml" not in mesh[0].get("data", {}):
        return "no waypoint.yaml in ConfigMap trellis-mesh"
    t = yaml.safe_load(mesh[0]["data"]["waypoint.yaml"])
    if not isinstance(t, dict):
        return f"waypoint.yaml is not a mapping: {t!r}"
    if WAYPOINT_REQUIRED - t.keys() or t.keys() - WAYPOINT_KNOWN:
        return f"waypoint.yaml fields {sorted(t)}: required {sorted(WAYPOINT_REQUIRED)}, known {sorted(WAYPOINT_KNOWN)}"
    cp = [d for d in by_kind["Deployment"] if d["metadata"]["name"] == "trellis-control-plane"][0]
    container = cp["spec"]["template"]["spec"]["containers"][0]
    if t["image"] != container["image"]:
        return f"waypoint image {t['image']} is not the chart's {container['image']}"
    if t.get("imagePullSecrets", []) != values.get("imagePullSecrets", []):
        return f"waypoint pull secrets {t.get('imagePullSecrets')} differ from the values'"
    if "--waypoint-config=/etc/trellis/waypoint.yaml" not in container["args"]:
        return "the control plane is not given the waypoint template"
    return None


def strict(schema):
    """The schema as the API server's strict field validation applies it: unknown fields
    of an object with declared properties are errors."""
    s = copy.deepcopy(schema)
    # The API server adds these to every custom resource's schema.
    s.setdefault("properties", {}).update({
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object"},
    })

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node.setdefault("additionalProperties", False)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(s)
    return s


def check_manifests_and_writes(schemas, waypoint_template):
    """The manifests of tests/chart/manifests/, what the control plane writes for them and
    the Gateway `trellisctl waypoint generate` prints: each one as the API server would take
    it. A status is validated merged into the object it is written to."""
    inputs = {}
    for f in sorted(MANIFESTS.glob("*.yaml")):
        for doc in load_all(f.read_text()):
            if not doc:
                continue
            key = (doc["kind"], doc["metadata"].get("namespace"), doc["metadata"]["name"])
            inputs[key] = doc
            if doc["metadata"]["name"] == "misspelt":
                # Meant to be refused by the control plane (and by the API server too).
                if not validate(doc, schemas):
                    fail(f"{f.name}: the misspelt policy passes the CRD schema")
                continue
            for err in validate(doc, schemas):
                fail(f"{f.name}: {doc['kind']}/{doc['metadata']['name']}: {err}")
    if waypoint_template is None:
        fail("no waypoint template rendered: the control plane's writes are not checked")
        return
    with tempfile.TemporaryDirectory() as tmp:
        template = pathlib.Path(tmp) / "waypoint.yaml"
        template.write_text(waypoint_template)
        # Any PEM text: the ConfigMap carries it unchanged.
        roots = pathlib.Path(tmp) / "roots.pem"
        roots.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
        out = subprocess.run([str(BIN / "trellis-control-plane"), "render",
                              "--config-dir", str(MANIFESTS), "--waypoint-config", str(template),
                              "--roots", str(roots)],
                             capture_output=True, text=True, check=False)
    if out.returncode != 0:
        fail(f"trellis-control-plane render failed ({out.returncode}): {out.stderr.strip()}")
        return
    written = {}
    for doc in load_all(out.stdout):
        if not doc:
            continue
        key = (doc["kind"], doc["metadata"].get("namespace"), doc["metadata"]["name"])
        if "status" in doc and key in inputs:
            merged = copy.deepcopy(inputs[key])
            merged["status"] = doc["status"]
            if key[2] == "misspelt":
                # As the API server would hold it: unknown fields pruned.
                merged["spec"] = {"action": "DENY"}
            doc = merged
        written.setdefault(doc["kind"], []).append(doc)
        for err in validate(doc, schemas):
            fail(f"control plane writes {doc['kind']}/{doc['metadata']['name']}: {err}")
    expected = {"ServiceAccount": 1, "Service": 1, "Deployment": 1, "Gateway": 1, "HTTPRoute": 1,
                "GRPCRoute": 1, "AuthorizationPolicy": 3, "PeerAuthentication": 1, "ConfigMap": 1}
    rejected = [d for d in written.get("AuthorizationPolicy", []) if d["metadata"]["name"] == "misspelt"]
    if not rejected or rejected[0]["status"]["conditions"][0]["reason"] != "Invalid" \
            or "namespacez" not in rejected[0]["status"]["conditions"][0]["message"]:
        fail(f"the misspelt policy's status does not say it is rejected and why: {rejected}")
    counts = {k: len(v) for k, v in written.items()}
    if counts != expected:
        fail(f"control plane writes {counts}, expected {expected}")
    print(f"control plane writes: {sum(counts.values())} objects checked ({', '.join(sorted(counts))})")
    out = subprocess.run([str(BIN / "trellisctl"), "waypoint", "generate", "-n", "shop",
                          "--name", "shop-waypoint", "--for", "all"],
                         capture_output=True, text=True, check=False)
    docs = [d for d in load_all(out.stdout) if d] if out.returncode == 0 else []
    if not any(d["kind"] == "Gateway" for d in docs):
        fail(f"trellisctl waypoint generate printed no Gateway: {out.stderr.strip()}")
    for doc in docs:
        for err in validate(doc, schemas):
            fail(f"trellisctl waypoint generate: {doc['kind']}/{doc['metadata']['name']}: {err}")


def main():
    chart = helm.Chart.load(str(CHART))
    crd_schemas = {}
    gateway_crds = gateway_api_crds()
    if len(gateway_crds) < 4:
        fail(f"Gateway API CRDs missing under {GATEWAY_API_CRDS}: found {[n for n, _ in gateway_crds]}")
    # The default value set's schemas: the chart's CRDs and the Gateway API's.
    schemas = crdschema.CrdSchemas()
    for source, crd in gateway_crds:
        schemas.add_crd(crd, source)
    waypoint_template = None
    for name, values in VALUE_SETS.items():
        try:
            chart.validate_schema(values)
        except Exception as e:  # noqa: BLE001 - any rejection is a failure here
            fail(f"{name}: values rejected by values.schema.json: {e}")
            continue
        lint = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE,
                         kube_version=f"v{KUBE}")
        for m in lint["messages"]:
            if m["severity"] >= 2:
                fail(f"{name}: lint {m['path']}: {m['error']}")
        for e in lint["errors"]:
            fail(f"{name}: lint: {e}")
        docs, raw = render(chart, values)
        kinds = sorted(d["kind"] for _, d in docs)
        print(f"{name}: {len(docs)} objects: {', '.join(kinds)}")
        if not any(p.endswith("NOTES.txt") for p in raw):
            fail(f"{name}: no NOTES.txt")
        # The chart's own CRDs first: objects of their kinds are checked against them.
        set_schemas = crdschema.CrdSchemas()
        for source, crd in gateway_crds:
            set_schemas.add_crd(crd, source)
        for path, doc in docs:
            if doc["kind"] == "CustomResourceDefinition":
                set_schemas.add_crd(doc, path)
                if name == "defaults":
                    schemas.add_crd(doc, path)
        for path, doc in docs:
            where = f"{name}: {path}: {doc['kind']}/{doc.get('metadata', {}).get('name')}"
            for err in validate(doc, set_schemas):
                fail(f"{where}: {err}")
            if doc["kind"] == "CustomResourceDefinition":
                for v in doc["spec"]["versions"]:
                    crd_schemas[(doc["spec"]["names"]["kind"], v["name"])] = \
                        v["schema"]["openAPIV3Schema"]
            if doc["kind"] == "GatewayClass" and not set_schemas.covers(doc):
                fail(f"{where}: no CRD schema for {doc['apiVersion']} {doc['kind']}")
        # What each value set must change.
        by_kind = {}
        for _, d in docs:
            by_kind.setdefault(d["kind"], []).append(d)
        if name == "defaults":
            crds = sorted(d["metadata"]["name"] for d in by_kind.get("CustomResourceDefinition", []))
            if crds != ["authorizationpolicies.security.istio.io",
                        "destinationrules.networking.istio.io",
                        "localtrafficpolicies.trellis.dev",
                        "peerauthentications.security.istio.io",
                        "requestauthentications.security.istio.io"]:
                fail(f"defaults: the Istio CRDs Trellis reads are not all rendered: {crds}")
            if "GatewayClass" not in by_kind:
                fail("defaults: no waypoint GatewayClass")
            else:
                # The check would have caught the description the API server refused.
                old = copy.deepcopy(by_kind["GatewayClass"][0])
                old["spec"]["description"] = OLD_GATEWAYCLASS_DESCRIPTION
                errors = validate(old, set_schemas)
                if not any("spec.description" in e and "too long" in e for e in errors):
                    fail(f"defaults: the old GatewayClass description is not refused: {errors}")
            mesh = [d for d in by_kind.get("ConfigMap", []) if d["metadata"]["name"] == "trellis-mesh"]
            if mesh:
                waypoint_template = mesh[0]["data"].get("waypoint.yaml")
        if name == "with-istio-base":
            # Istio's base chart has Istio's CRDs, not Trellis's own.
            own = [d["metadata"]["name"] for d in by_kind.get("CustomResourceDefinition", [])]
            if own != ["localtrafficpolicies.trellis.dev"] or "GatewayClass" in by_kind:
                fail(f"with-istio-base: Istio CRDs or GatewayClass rendered although disabled: {own}")
            agent = [d for d in by_kind["DaemonSet"] if d["metadata"]["name"] == "trellis-node-agent"][0]
            if "--fail-open" not in agent["spec"]["template"]["spec"]["containers"][0]["args"]:
                fail("with-istio-base: failOpen does not reach the node agent")
        err = check_waypoint_template(by_kind, values)
        if err:
            fail(f"{name}: {err}")
        # The node agent restores the node on uninstall: it names its DaemonSet and may
        # read exactly that.
        agent = [d for d in by_kind["DaemonSet"] if d["metadata"]["name"] == "trellis-node-agent"][0]
        if f"--daemonset={NAMESPACE}/trellis-node-agent" not in agent["spec"]["template"]["spec"]["containers"][0]["args"]:
            fail(f"{name}: the node agent is not told its DaemonSet")
        agent_roles = [r for r in by_kind.get("Role", []) if r["metadata"]["name"] == "trellis-node-agent"]
        if not agent_roles or agent_roles[0]["rules"] != [{"apiGroups": ["apps"], "resources": ["daemonsets"],
                                                          "resourceNames": ["trellis-node-agent"], "verbs": ["get", "list", "watch"]}]:
            fail(f"{name}: the node agent's Role is not exactly 'read and watch its own DaemonSet'")
        # Exposure: unauthenticated debug endpoints stay on loopback and off the Services.
        cp = [d for d in by_kind["Deployment"] if d["metadata"]["name"] == "trellis-control-plane"][0]
        cp_args = cp["spec"]["template"]["spec"]["containers"][0]["args"]
        if "--admin-addr=127.0.0.1:15014" not in cp_args:
            fail(f"{name}: the control plane's admin port is not bound to localhost: {cp_args}")
        for svc in by_kind.get("Service", []):
            exposed = {p["port"] for p in svc["spec"]["ports"]} & {15000, 15014}
            if exposed:
                fail(f"{name}: Service {svc['metadata']['name']} publishes admin port(s) {sorted(exposed)}")
        for kind in ("Deployment", "DaemonSet"):
            for d in by_kind.get(kind, []):
                for c in d["spec"]["template"]["spec"]["containers"]:
                    for arg in c.get("args", []):
                        if arg.startswith("--admin-addr=") and not arg.startswith("--admin-addr=127.0.0.1:"):
                            fail(f"{name}: {kind} {d['metadata']['name']}: {arg} is not on localhost")
        # Tracing: an opentelemetry provider in the mesh config only when a collector is set
        # (sampling 0 stays 0, not Helm's "empty" default).
        mesh_cm = [d for d in by_kind.get("ConfigMap", []) if d["metadata"]["name"] == "trellis-mesh"]
        if mesh_cm:
            mesh_yaml = yaml.safe_load(mesh_cm[0]["data"]["mesh.yaml"])
            if name == "lab":
                want = {"extensionProviders": [{"name": "otel", "opentelemetry": {
                            "service": "otel.observability.svc.cluster.local", "port": 4317}}],
                        "defaultProviders": {"tracing": ["otel"]},
                        "defaultConfig": {"tracing": {"sampling": 0}}}
                got = {k: mesh_yaml.get(k) for k in want}
                if got != want:
                    fail(f"lab: the mesh config's tracing: {got}")
            elif "extensionProviders" in mesh_yaml or "defaultProviders" in mesh_yaml:
                fail(f"{name}: tracing rendered without a collector: {mesh_yaml}")
        if name == "lab" and "PodDisruptionBudget" in by_kind:
            fail("lab: PodDisruptionBudget rendered although disabled")

    # The values schema rejects wrong values.
    for bad in [{"ztunnel": {"workerThreads": 0}}, {"nodeAgent": {"cniBinDir": "relative"}},
                {"controlPlane": {"replicas": "two"}}, {"unknownKey": True},
                {"mesh": {"trustDomain": "Has Spaces"}}]:
        try:
            chart.validate_schema(bad)
            fail(f"values.schema.json accepted {bad}")
        except Exception:  # noqa: BLE001 - a rejection is what we want
            pass

    # The CRD schemas accept the example policies and reject a misspelled field.
    examples = []
    for f in sorted((ROOT / "examples").glob("**/*.yaml")):
        for doc in load_all(f.read_text()):
            if doc and doc.get("apiVersion", "").startswith(("security.istio.io/", "trellis.dev/")):
                examples.append((f.name, doc))
    if not examples:
        fail("no security.istio.io examples found under examples/")
    for fname, doc in examples:
        version = doc["apiVersion"].split("/")[1]
        schema = crd_schemas.get((doc["kind"], version))
        if schema is None:
            fail(f"{fname}: no CRD schema for {doc['kind']} {version}")
            continue
        try:
            jsonschema.validate(doc, strict(schema))
        except jsonschema.ValidationError as e:
            fail(f"{fname}: {doc['kind']}/{doc['metadata']['name']} rejected: {e.message}")
        wrong = copy.deepcopy(doc)
        wrong["spec"]["unknownField"] = True
        if wrong["spec"].get("rules"):
            rule = wrong["spec"]["rules"][0]
            if "from" in rule:
                rule["form"] = rule.pop("from")
        try:
            jsonschema.validate(wrong, strict(schema))
            fail(f"{fname}: a misspelled field in {doc['kind']}/{doc['metadata']['name']} was accepted")
        except jsonschema.ValidationError:
            pass
    # The status conditions are maps keyed by type (server-side apply merges them).
    for kind in ("AuthorizationPolicy", "PeerAuthentication", "RequestAuthentication"):
        schema = crd_schemas.get((kind, "v1"))
        if schema is None:
            fail(f"{kind}: no v1 CRD schema rendered")
            continue
        conditions = schema["properties"]["status"]["properties"]["conditions"]
        if conditions.get("x-kubernetes-list-map-keys") != ["type"]:
            fail(f"{kind}: status.conditions is not a map keyed by type (server-side apply would take the whole list)")
    # The example policies, validated as a whole (CEL rules included).
    for fname, doc in examples:
        for err in validate(doc, schemas):
            fail(f"examples/{fname}: {doc['kind']}/{doc['metadata']['name']}: {err}")
    # The LocalTrafficPolicy CRD's rules are live: an abort with two statuses, a target of
    # another kind and a policy that does nothing are refused.
    ltp = [d for _, d in examples if d["kind"] == "LocalTrafficPolicy"]
    if not ltp:
        fail("no LocalTrafficPolicy example under examples/")
    else:
        for what, change in [
            ("two abort statuses", lambda s: s.update(fault={"abort": {"httpStatus": 503, "grpcStatus": 14, "percentage": 1}})),
            ("a Deployment target", lambda s: s["targetRefs"][0].update(group="apps", kind="Deployment")),
            ("neither rateLimit nor fault", lambda s: (s.pop("rateLimit", None), s.pop("fault", None))),
        ]:
            bad = copy.deepcopy(ltp[0])
            change(bad["spec"])
            if not validate(bad, schemas):
                fail(f"LocalTrafficPolicy with {what} was accepted by its CRD")
    check_manifests_and_writes(schemas, waypoint_template)
    # A CEL rule of the Gateway API CRDs is live: two listeners of one name are refused.
    twice = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
             "metadata": {"name": "w", "namespace": "shop"},
             "spec": {"gatewayClassName": "istio-waypoint",
                      "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"},
                                    {"name": "mesh", "port": 15009, "protocol": "HBONE"}]}}
    if not validate(twice, schemas):
        fail("a Gateway with two listeners named alike was accepted: the CRD's rules are not applied")
    print(f"CRD schemas: {schemas.rules_evaluated} CEL rule evaluations, "
          f"{schemas.transition_rules_skipped} transition rules (updates only) not evaluated")
    print(f"CRD schemas: {len(examples)} example policies checked")

    if failures:
        print(f"chart check: {len(failures)} failure(s)")
        return 1
    print("chart check: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
