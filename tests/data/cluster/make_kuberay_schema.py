"""Writes kuberay-v1.6.2.schema.json: the fields of KubeRay's RayCluster / RayJob (ray.io/v1) as a
JSON Schema (draft 2020-12) that tests/test_cluster_configs.py walks the manifests in cluster/kuberay/
against, offline.

Two sources, both recorded in the output's "x-provenance":

* The ray.io/v1 types (RayClusterSpec, HeadGroupSpec, WorkerGroupSpec, AuthOptions, RayJobSpec, ...)
  are transcribed below, field by field, from KubeRay's generated CRD API reference at release
  v1.6.2 (docs/reference/api.md, commit 0a9eabde561ab59ab4bbe626072c359da9214484). Upstream generates
  that page from the Go CRD types with crd-ref-docs and fails CI when it drifts from them, so it lists
  exactly the fields the CRD has. The page gives no "required" markers; the required lists here are
  those of the operator's CRD YAML (ray-operator/config/crd/bases/ray.io_rayclusters.yaml at commit
  1184bc872c0801e59c18caf8a1a4eb5f2800ce93), which is stricter than v1.6.2 (rayStartParams has since
  become optional), so a manifest that passes here passes both.
* The Kubernetes types the CRD embeds (PodTemplateSpec and everything under it, Service,
  ResourceRequirements, EnvVar, ...) come from the strict Kubernetes v1.34 JSON Schema shipped in the
  PyPI package kubernetes-validate (1.37.0), which is generated from Kubernetes' own OpenAPI document:
  the same Go types controller-gen inlines into KubeRay's CRD. KubeRay v1.6 builds against
  k8s.io/api v0.34. "additionalProperties": false there is what makes a misspelled container field
  an error.

Descriptions are dropped: the file holds field names, types, enums and required lists only.

Regenerate (needs no project install; run from the repository root):
    pip download --no-deps kubernetes-validate==1.37.0 -d /tmp/kv
    unzip -q -o /tmp/kv/kubernetes_validate-1.37.0-py3-none-any.whl -d /tmp/kv
    python tests/data/cluster/make_kuberay_schema.py \\
        /tmp/kv/kubernetes_validate/kubernetes-json-schema/v1.34.0-local-strict/_definitions.json
When moving to a newer KubeRay, update KUBERAY_VERSION and the tables below from that release's
docs/reference/api.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

KUBERAY_VERSION = "v1.6.2"
KUBERAY_API_REFERENCE = ("ray-project/kuberay docs/reference/api.md"
                         " @ 0a9eabde561ab59ab4bbe626072c359da9214484 (tag v1.6.2)")
KUBERAY_CRD_REQUIRED_FROM = ("ray-project/kuberay ray-operator/config/crd/bases/ray.io_rayclusters.yaml"
                             " @ 1184bc872c0801e59c18caf8a1a4eb5f2800ce93")
K8S_SOURCE = "PyPI kubernetes-validate 1.37.0, kubernetes-json-schema/v1.34.0-local-strict/_definitions.json"
OUT = Path(__file__).with_name(f"kuberay-{KUBERAY_VERSION}.schema.json")

K8S = "io.k8s.api.core.v1."
META = "io.k8s.apimachinery.pkg.apis.meta.v1."
RAY = "io.ray.v1."

# --- a small vocabulary for the transcription ------------------------------------------------
STRING: dict[str, Any] = {"type": "string"}
INTEGER: dict[str, Any] = {"type": "integer"}
NUMBER: dict[str, Any] = {"type": "number"}
BOOLEAN: dict[str, Any] = {"type": "boolean"}
STRING_MAP: dict[str, Any] = {"type": "object", "additionalProperties": {"type": "string"}}


def ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/$defs/{name}"}


def array(item: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "array", "items": item, **extra}


def enum(*values: str) -> dict[str, Any]:
    return {"type": "string", "enum": list(values)}


def obj(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    node: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        node["required"] = list(required)
    return node


# Fields whose types this project does not use are not transcribed: the schema rejects any value
# there ("not": {}), so a manifest that starts using one fails until its type is transcribed,
# rather than passing unchecked.
UNTRANSCRIBED: dict[str, Any] = {"not": {}, "x-not-transcribed": "transcribe this type before using the field"}

# --- ray.io/v1, KubeRay v1.6.2 (every field of each type, in the reference's order) ----------
RAY_TYPES: dict[str, dict[str, Any]] = {
    "RayCluster": obj({
        "apiVersion": enum("ray.io/v1"),
        "kind": enum("RayCluster"),
        "metadata": ref(META + "ObjectMeta"),
        "spec": ref(RAY + "RayClusterSpec"),
        "status": {"type": "object"},
    }),
    "RayJob": obj({
        "apiVersion": enum("ray.io/v1"),
        "kind": enum("RayJob"),
        "metadata": ref(META + "ObjectMeta"),
        "spec": ref(RAY + "RayJobSpec"),
        "status": {"type": "object"},
    }),
    "RayClusterSpec": obj({
        "upgradeStrategy": ref(RAY + "RayClusterUpgradeStrategy"),
        "authOptions": ref(RAY + "AuthOptions"),
        "suspend": BOOLEAN,
        "managedBy": STRING,
        "autoscalerOptions": ref(RAY + "AutoscalerOptions"),
        "headServiceAnnotations": STRING_MAP,
        "enableInTreeAutoscaling": BOOLEAN,
        "gcsFaultToleranceOptions": ref(RAY + "GcsFaultToleranceOptions"),
        "headGroupSpec": ref(RAY + "HeadGroupSpec"),
        "rayVersion": STRING,
        "workerGroupSpecs": array(ref(RAY + "WorkerGroupSpec")),
    }, required=("headGroupSpec",)),
    "AuthOptions": obj({
        "enableK8sTokenAuth": BOOLEAN,
        "secretName": STRING,
        "mode": enum("disabled", "token"),
    }),
    "AutoscalerOptions": obj({
        "resources": ref(K8S + "ResourceRequirements"),
        "image": STRING,
        "imagePullPolicy": STRING,
        "securityContext": ref(K8S + "SecurityContext"),
        "idleTimeoutSeconds": INTEGER,
        "upscalingMode": enum("Default", "Aggressive", "Conservative"),
        "version": enum("v1", "v2"),
        "env": array(ref(K8S + "EnvVar")),
        "envFrom": array(ref(K8S + "EnvFromSource")),
        "volumeMounts": array(ref(K8S + "VolumeMount")),
    }),
    "RayClusterUpgradeStrategy": obj({"type": enum("Recreate", "None")}),
    "GcsFaultToleranceOptions": obj({
        "redisUsername": ref(RAY + "RedisCredential"),
        "redisPassword": ref(RAY + "RedisCredential"),
        "externalStorageNamespace": STRING,
        "redisAddress": STRING,
    }),
    "RedisCredential": obj({"valueFrom": ref(K8S + "EnvVarSource"), "value": STRING}),
    "HeadGroupSpec": obj({
        "template": ref(K8S + "PodTemplateSpec"),
        "headService": ref(K8S + "Service"),
        "enableIngress": BOOLEAN,
        "resources": STRING_MAP,
        "labels": STRING_MAP,
        "rayStartParams": STRING_MAP,
        "serviceType": STRING,
    }, required=("template",)),
    "WorkerGroupSpec": obj({
        "suspend": BOOLEAN,
        "groupName": STRING,
        "replicas": INTEGER,
        "minReplicas": INTEGER,
        "maxReplicas": INTEGER,
        "idleTimeoutSeconds": INTEGER,
        "resources": STRING_MAP,
        "labels": STRING_MAP,
        "rayStartParams": STRING_MAP,
        "template": ref(K8S + "PodTemplateSpec"),
        "scaleStrategy": obj({"workersToDelete": array(STRING)}),
        "numOfHosts": INTEGER,
    }, required=("groupName", "maxReplicas", "minReplicas", "rayStartParams", "template")),
    "RayJobSpec": obj({
        "activeDeadlineSeconds": INTEGER,
        "backoffLimit": INTEGER,
        "rayClusterSpec": ref(RAY + "RayClusterSpec"),
        "submitterPodTemplate": ref(K8S + "PodTemplateSpec"),
        "metadata": STRING_MAP,
        "clusterSelector": STRING_MAP,
        "submitterConfig": obj({"backoffLimit": INTEGER}),
        "managedBy": STRING,
        "deletionStrategy": UNTRANSCRIBED,
        "entrypoint": STRING,
        "runtimeEnvYAML": STRING,
        "jobId": STRING,
        "submissionMode": enum("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"),
        "entrypointResources": STRING,
        "entrypointNumCpus": NUMBER,
        "entrypointNumGpus": NUMBER,
        "ttlSecondsAfterFinished": INTEGER,
        "preRunningDeadlineSeconds": {"type": "integer", "minimum": 1},
        "shutdownAfterJobFinishes": BOOLEAN,
        "suspend": BOOLEAN,
    }),
}


def strip_descriptions(node: Any) -> Any:
    """Drop prose; a property *named* "description" (a dict value) is kept."""
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items() if not (k == "description" and isinstance(v, str))}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def referenced(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        target = node.get("$ref")
        if isinstance(target, str) and target.startswith("#/$defs/"):
            found.add(target.removeprefix("#/$defs/"))
        for v in node.values():
            found |= referenced(v)
    elif isinstance(node, list):
        for v in node:
            found |= referenced(v)
    return found


def build(k8s_definitions: dict[str, Any]) -> dict[str, Any]:
    ray_defs = {RAY + name: node for name, node in RAY_TYPES.items()}
    k8s_all = k8s_definitions["$defs"]
    # Closure of every Kubernetes type the ray.io types reach.
    wanted = {name for name in referenced(ray_defs) if not name.startswith(RAY)}
    k8s_defs: dict[str, Any] = {}
    while wanted:
        name = wanted.pop()
        if name in k8s_defs:
            continue
        node = strip_descriptions(k8s_all[name])
        k8s_defs[name] = node
        wanted |= referenced(node) - set(k8s_defs)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "x-provenance": {
            "kuberay_version": KUBERAY_VERSION,
            "ray.io_types_transcribed_from": KUBERAY_API_REFERENCE,
            "ray.io_required_lists_from": KUBERAY_CRD_REQUIRED_FROM,
            "kubernetes_types_from": K8S_SOURCE,
            "generator": "tests/data/cluster/make_kuberay_schema.py",
        },
        "x-roots": {"RayCluster": RAY + "RayCluster", "RayJob": RAY + "RayJob"},
        "$defs": {**k8s_defs, **ray_defs},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("k8s_definitions", type=Path, help="kubernetes-validate's strict _definitions.json")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    schema = build(json.loads(args.k8s_definitions.read_text()))
    args.out.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out} ({len(schema['$defs'])} types)")


if __name__ == "__main__":
    main()
