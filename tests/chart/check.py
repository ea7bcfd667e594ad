#!/usr/bin/env python3
"""Checks the Helm chart charts/trellis without a cluster or a helm binary.

- Renders it with the Helm engine (PyPI helm-python-sdk, Helm's Go SDK over a C ABI) for the
  default values and two non-default value sets, and lints it (strict, Kubernetes 1.30).
- Validates every rendered object with kubernetes-validate --strict against Kubernetes 1.30
  (objects of kinds Kubernetes does not define, the Gateway API's GatewayClass, are checked
  against their required shape here).
- Checks that the values schema rejects wrong values, and that the security.istio.io CRD
  schemas accept the seed articles' example policies (examples/) and reject a misspelled
  field, as the API server's strict field validation would.

Exit status 0 when everything holds; otherwise each failure is printed and the status is 1.
"""

import copy
import pathlib
import sys

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "trellis"
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
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append((path, doc))
    return docs, out


def check_gatewayclass(doc):
    spec = doc.get("spec") or {}
    ok = (doc.get("apiVersion") == "gateway.networking.k8s.io/v1"
          and doc.get("metadata", {}).get("name")
          and "/" in spec.get("controllerName", ""))
    return None if ok else f"GatewayClass shape: {doc}"


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


def main():
    chart = helm.Chart.load(str(CHART))
    crd_schemas = {}
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
        for path, doc in docs:
            where = f"{name}: {path}: {doc['kind']}/{doc.get('metadata', {}).get('name')}"
            if doc["kind"] == "GatewayClass":
                err = check_gatewayclass(doc)
                if err:
                    fail(f"{where}: {err}")
                continue
            try:
                kubernetes_validate.validate(doc, KUBE, strict=True)
            except kubernetes_validate.ValidationError as e:
                fail(f"{where}: {e.message} at {'/'.join(map(str, e.path))}")
            except Exception as e:  # noqa: BLE001
                fail(f"{where}: {e}")
            if doc["kind"] == "CustomResourceDefinition":
                for v in doc["spec"]["versions"]:
                    crd_schemas[(doc["spec"]["names"]["kind"], v["name"])] = \
                        v["schema"]["openAPIV3Schema"]
        # What each value set must change.
        by_kind = {}
        for _, d in docs:
            by_kind.setdefault(d["kind"], []).append(d)
        if name == "defaults":
            if len(by_kind.get("CustomResourceDefinition", [])) != 3:
                fail("defaults: the three security.istio.io CRDs are not all rendered")
            if "GatewayClass" not in by_kind:
                fail("defaults: no waypoint GatewayClass")
        if name == "with-istio-base":
            if "CustomResourceDefinition" in by_kind or "GatewayClass" in by_kind:
                fail("with-istio-base: CRDs or GatewayClass rendered although disabled")
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
        for doc in yaml.safe_load_all(f.read_text()):
            if doc and doc.get("apiVersion", "").startswith("security.istio.io/"):
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
    # The status the control plane writes (server-side apply) fits the schema.
    for kind in ("AuthorizationPolicy", "PeerAuthentication", "RequestAuthentication"):
        schema = crd_schemas.get((kind, "v1"))
        if schema is None:
            continue
        doc = {"apiVersion": "security.istio.io/v1", "kind": kind,
               "metadata": {"name": "p", "namespace": "shop"}, "spec": {},
               "status": {"conditions": [{"type": "ZtunnelAccepted", "status": "True",
                                          "reason": "Accepted", "message": "attached to ztunnel",
                                          "observedGeneration": "3",
                                          "lastTransitionTime": "2026-12-01T00:00:00Z"}]}}
        try:
            jsonschema.validate(doc, strict(schema))
        except jsonschema.ValidationError as e:
            fail(f"{kind}: the control plane's status is rejected: {e.message}")
        conditions = schema["properties"]["status"]["properties"]["conditions"]
        if conditions.get("x-kubernetes-list-map-keys") != ["type"]:
            fail(f"{kind}: status.conditions is not a map keyed by type (server-side apply would take the whole list)")
    print(f"CRD schemas: {len(examples)} example policies checked")

    if failures:
        print(f"chart check: {len(failures)} failure(s)")
        return 1
    print("chart check: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
