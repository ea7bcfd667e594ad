"""Validates objects of CRD-defined kinds against their CustomResourceDefinition, offline,
the way the API server does on create (a documented subset; docs/install.md, "Chart checks"):

1. Defaulting: every `default` of the structural schema is filled in first, as the API
   server does before it validates (CEL rules see defaulted values).
2. The OpenAPI v3 schema, as JSON Schema: types, `required`, `enum`, `pattern`,
   `minLength`/`maxLength`, `minItems`/`maxItems`, `minimum`/`maximum`, `nullable`,
   `x-kubernetes-int-or-string`; unknown fields are errors (the API server's strict field
   validation, which kubectl asks for) unless `x-kubernetes-preserve-unknown-fields`.
3. `x-kubernetes-list-type: map` keys and `set` items are unique.
4. CEL `x-kubernetes-validations` rules, evaluated with cel-python plus the Kubernetes
   library functions the vendored CRDs use. Transition rules (those reading `oldSelf`) apply
   only to updates and are not evaluated; a rule calling a function this checker lacks is
   an error of the check itself, never skipped silently. `format` is not checked.
"""

import copy
import re

import celpy
import celpy.celtypes as ct
import ipaddress
import jsonschema
import urllib.parse


def _is_ip(s, *_):
    try:
        ipaddress.ip_address(str(s))
        return ct.BoolType(True)
    except ValueError:
        return ct.BoolType(False)


def _is_cidr(s, *_):
    try:
        ipaddress.ip_network(str(s), strict=False)
        return ct.BoolType("/" in str(s))
    except ValueError:
        return ct.BoolType(False)


def _is_url(s, *_):
    # Kubernetes' isURL: an absolute URI Go's url.Parse accepts.
    try:
        u = urllib.parse.urlsplit(str(s))
    except ValueError:
        return ct.BoolType(False)
    return ct.BoolType(bool(u.scheme))


def _split(s, sep, n=None):
    parts = str(s).split(str(sep)) if n is None else str(s).split(str(sep), int(n) - 1)
    return ct.ListType([ct.StringType(p) for p in parts])


# The Kubernetes CEL library (k8s.io/apiserver/pkg/cel/library) functions the vendored CRDs
# call; the rest of what they use is standard CEL.
K8S_FUNCTIONS = {
    "isIP": _is_ip,
    "isCIDR": _is_cidr,
    "isURL": _is_url,
    "lowerAscii": lambda s: ct.StringType(str(s).lower()),
    "upperAscii": lambda s: ct.StringType(str(s).upper()),
    "split": _split,
    "trim": lambda s: ct.StringType(str(s).strip()),
}


class CheckError(Exception):
    """The checker cannot evaluate a rule: a defect of the check, not of the object."""


def _json_schema(node):
    """The structural schema `node` as JSON Schema (strict: unknown fields are errors)."""
    if isinstance(node, list):
        return [_json_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k in ("description", "default", "format", "x-kubernetes-validations",
                 "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
                 "x-kubernetes-map-type", "x-kubernetes-preserve-unknown-fields",
                 "x-kubernetes-int-or-string", "x-kubernetes-embedded-resource", "nullable",
                 "example", "externalDocs"):
            continue
        if k in ("properties", "patternProperties"):
            out[k] = {name: _json_schema(s) for name, s in v.items()}
        else:
            out[k] = _json_schema(v)
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else out["type"] + ["null"]
    if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def _apply_defaults(schema, value):
    """Fills in `default`s below `schema` into `value` (in place), as the API server does."""
    if isinstance(value, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                _apply_defaults(sub, value[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for v in value.values():
                _apply_defaults(extra, v)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for v in value:
            _apply_defaults(schema["items"], v)


class CrdSchemas:
    """The schemas of a set of CRDs, by (apiVersion, kind)."""

    def __init__(self):
        self.schemas = {}
        self.sources = {}
        self._programs = {}
        self._env = celpy.Environment()
        self.rules_evaluated = 0
        self.transition_rules_skipped = 0

    def add_crd(self, crd, source):
        group = crd["spec"]["group"]
        kind = crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            if not v.get("served", True):
                continue
            key = (f"{group}/{v['name']}", kind)
            schema = copy.deepcopy(v["schema"]["openAPIV3Schema"])
            # The API server validates these itself for every custom resource.
            schema.setdefault("properties", {}).update({
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "metadata": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            })
            self.schemas[key] = (schema, jsonschema.Draft7Validator(_json_schema(schema)))
            self.sources[key] = source

    def covers(self, obj):
        return (obj.get("apiVersion"), obj.get("kind")) in self.schemas

    def validate(self, obj):
        """The API server's reasons to refuse `obj` on create, as strings (empty: valid)."""
        schema, validator = self.schemas[(obj.get("apiVersion"), obj.get("kind"))]
        obj = copy.deepcopy(obj)
        _apply_defaults(schema, obj)
        errors = []
        for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.path))):
            errors.append(f"{_path(e.absolute_path)}: {e.message}")
        if errors:
            # CEL rules run on values of the declared types only (as in the API server).
            return errors
        self._walk(schema, obj, [], errors)
        return errors

    def _walk(self, schema, value, path, errors):
        if value is None:
            return
        kind = schema.get("x-kubernetes-list-type")
        if isinstance(value, list) and kind in ("map", "set"):
            keys = schema.get("x-kubernetes-list-map-keys") or []
            seen = set()
            for item in value:
                k = repr([item.get(f) for f in keys]) if kind == "map" else repr(item)
                if k in seen:
                    errors.append(f"{_path(path)}: duplicate entry {k} (list-type {kind})")
                seen.add(k)
        for rule in schema.get("x-kubernetes-validations") or []:
            self._check_rule(rule, value, path, errors)
        if isinstance(value, dict):
            for name, sub in (schema.get("properties") or {}).items():
                if name in value:
                    self._walk(sub, value[name], path + [name], errors)
            extra = schema.get("additionalProperties")
            if isinstance(extra, dict):
                for k, v in value.items():
                    self._walk(extra, v, path + [k], errors)
        elif isinstance(value, list) and isinstance(schema.get("items"), dict):
            for i, v in enumerate(value):
                self._walk(schema["items"], v, path + [i], errors)

    def _check_rule(self, rule, value, path, errors):
        text = rule["rule"]
        if re.search(r"\boldSelf\b", text):
            self.transition_rules_skipped += 1
            return
        program = self._programs.get(text)
        if program is None:
            try:
                program = self._env.program(self._env.compile(text), functions=K8S_FUNCTIONS)
            except celpy.CELParseError as e:
                raise CheckError(f"CEL rule does not compile: {text!r}: {e}") from e
            self._programs[text] = program
        self.rules_evaluated += 1
        try:
            result = program.evaluate({"self": celpy.json_to_cel(value)})
        except celpy.CELEvalError as e:
            undeclared = "undeclared reference" in str(e.args[0] if e.args else e)
            if undeclared:
                raise CheckError(f"CEL rule uses a function the checker lacks: {text!r}: {str(e)[:200]}") from e
            # A rule that fails to evaluate (a missing field) refuses the object, as in the
            # API server.
            errors.append(f"{_path(path)}: {rule.get('message', text)} (rule {text!r} failed: {str(e)[:120]})")
            return
        if isinstance(result, celpy.CELEvalError):
            errors.append(f"{_path(path)}: {rule.get('message', text)} (rule {text!r} failed: {str(result)[:120]})")
        elif result is not True and result != ct.BoolType(True):
            errors.append(f"{_path(path)}: {rule.get('message') or 'failed rule'}: {text}")


def _path(path):
    return ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in path).replace(".[", "[") or "<root>"
