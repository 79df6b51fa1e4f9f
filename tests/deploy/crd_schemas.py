"""JSON schemas for the custom resources strata renders, for the tests' structural checks.

``kubernetes-validate`` carries only the core API's schemas, so a ScaledObject or a
ServiceMonitor cannot be checked with it. These schemas transcribe, from each CRD's
``openAPIV3Schema``, the fields strata writes and the ones the CRD requires:
``keda.sh/v1alpha1`` ScaledObject (kedacore/keda ``config/crd/bases/
keda.sh_scaledobjects.yaml``, KEDA 2.x) and ``monitoring.coreos.com/v1`` ServiceMonitor
(prometheus-operator ``example/prometheus-operator-crd/
monitoring.coreos.com_servicemonitors.yaml``). Unknown fields fail
(``additionalProperties: false``) where the CRD does not preserve them, so a misspelled
field is caught as the API server's structural schema would drop or reject it.
"""

from __future__ import annotations

from typing import Any

import jsonschema

_INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
_QUANTITY = {"anyOf": [{"type": "integer"}, {"type": "string", "pattern":
             r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
             r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"}]}
_METADATA = {"type": "object", "required": ["name", "namespace"], "properties": {
    "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
    "namespace": {"type": "string"},
    "labels": {"type": "object", "additionalProperties": {"type": "string"}}},
    "additionalProperties": False}


def _object(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False}


_SCALING_RULES = _object({
    "policies": {"type": "array", "items": _object({
        "periodSeconds": _INT32, "type": {"type": "string"}, "value": _INT32},
        ("periodSeconds", "type", "value"))},
    "selectPolicy": {"type": "string"},
    "stabilizationWindowSeconds": _INT32,
})

SCALED_OBJECT = _object({
    "apiVersion": {"const": "keda.sh/v1alpha1"},
    "kind": {"const": "ScaledObject"},
    "metadata": _METADATA,
    "spec": _object({
        "advanced": _object({
            "horizontalPodAutoscalerConfig": _object({
                "behavior": _object({"scaleDown": _SCALING_RULES, "scaleUp": _SCALING_RULES}),
                "name": {"type": "string"}}),
            "restoreToOriginalReplicaCount": {"type": "boolean"}}),
        "cooldownPeriod": _INT32,
        "initialCooldownPeriod": _INT32,
        "idleReplicaCount": _INT32,
        "maxReplicaCount": _INT32,
        "minReplicaCount": _INT32,
        "pollingInterval": _INT32,
        "scaleTargetRef": _object({"apiVersion": {"type": "string"},
                                   "envSourceContainerName": {"type": "string"},
                                   "kind": {"type": "string"}, "name": {"type": "string"}},
                                  ("name",)),
        "triggers": {"type": "array", "minItems": 1, "items": _object({
            "authenticationRef": _object({"kind": {"type": "string"},
                                          "name": {"type": "string"}}, ("name",)),
            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
            "name": {"type": "string"},
            "type": {"type": "string"},
            "useCachedMetrics": {"type": "boolean"}}, ("metadata", "type"))},
    }, ("scaleTargetRef", "triggers")),
}, ("apiVersion", "kind", "metadata", "spec"))

_LABEL_SELECTOR = _object({
    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
    "matchExpressions": {"type": "array", "items": _object({
        "key": {"type": "string"}, "operator": {"type": "string"},
        "values": {"type": "array", "items": {"type": "string"}}}, ("key", "operator"))},
})

SERVICE_MONITOR = _object({
    "apiVersion": {"const": "monitoring.coreos.com/v1"},
    "kind": {"const": "ServiceMonitor"},
    "metadata": _METADATA,
    "spec": _object({
        "endpoints": {"type": "array", "items": _object({
            "port": {"type": "string"},
            "targetPort": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
            "path": {"type": "string"},
            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
            "interval": {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?"
                         r"(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
            "scrapeTimeout": {"type": "string"},
            "honorLabels": {"type": "boolean"},
            "bearerTokenSecret": {"type": "object"},
            "authorization": {"type": "object"},
            "relabelings": {"type": "array"},
            "metricRelabelings": {"type": "array"}})},
        "jobLabel": {"type": "string"},
        "namespaceSelector": _object({"any": {"type": "boolean"},
                                      "matchNames": {"type": "array",
                                                     "items": {"type": "string"}}}),
        "podTargetLabels": {"type": "array", "items": {"type": "string"}},
        "sampleLimit": {"type": "integer", "minimum": 0},
        "selector": _LABEL_SELECTOR,
        "targetLabels": {"type": "array", "items": {"type": "string"}},
    }, ("selector",)),
}, ("apiVersion", "kind", "metadata", "spec"))

SCHEMAS = {"ScaledObject": SCALED_OBJECT, "ServiceMonitor": SERVICE_MONITOR}


def validate_crd(obj: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``obj`` fits its CRD's fields."""
    jsonschema.validate(obj, SCHEMAS[obj["kind"]])
