"""The Kubernetes manifests (k8s/): every overlay renders with kustomize, every core object validates
against the Kubernetes OpenAPI schema (kubernetes-validate, offline), RayCluster/RayJob validate against
the KubeRay v1.7.0 CRD schemas (k8s/schemas, unknown fields rejected), and the policies hold: no secret
values, non-root pods, requests and limits on every container, images pinned, dashboard internal only."""

from __future__ import annotations

import copy
import functools
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = {"dev-cpu": "rpt-dev", "dev-cpu/jobs": "rpt-dev", "gpu": "rpt", "gpu/jobs": "rpt"}
KUBERNETES_VERSION = "1.32.0"  # oldest Kubernetes the manifests target (KubeRay 1.7 supports it)
SECRETISH = re.compile(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY|PRIVATE)", re.I)

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None,
                                   reason="kubectl (with its built-in kustomize) is not installed")


@functools.cache
def render(overlay: str) -> list[dict[str, Any]]:
    out = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def all_objects() -> list[tuple[str, dict[str, Any]]]:
    return [(o, obj) for o in OVERLAYS for obj in render(o)]


# --- walking pod specs wherever they are nested ------------------------------------------------
def pod_specs(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, PodSpec) for every pod template in the object, CRDs included."""
    kind, spec = obj["kind"], obj.get("spec", {})
    name = f"{kind}/{obj['metadata']['name']}"
    found = []
    if kind in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
        found.append((name, spec["template"]["spec"]))

    def cluster(prefix: str, cs: dict[str, Any]) -> None:
        found.append((f"{prefix} head", cs["headGroupSpec"]["template"]["spec"]))
        for g in cs.get("workerGroupSpecs", []):
            found.append((f"{prefix} {g['groupName']}", g["template"]["spec"]))

    if kind == "RayCluster":
        cluster(name, spec)
    if kind == "RayJob":
        if "rayClusterSpec" in spec:
            cluster(name, spec["rayClusterSpec"])
        if "submitterPodTemplate" in spec:
            found.append((f"{name} submitter", spec["submitterPodTemplate"]["spec"]))
    return found


def ray_cluster_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    if obj["kind"] == "RayCluster":
        return [obj["spec"]]
    if obj["kind"] == "RayJob" and "rayClusterSpec" in obj["spec"]:
        return [obj["spec"]["rayClusterSpec"]]
    return []


# --- CRD schema validation -----------------------------------------------------------------------
@functools.cache
def crd_validator(kind: str):
    import jsonschema

    path = K8S / "schemas" / {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}[kind]
    crd = yaml.safe_load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    return jsonschema.Draft7Validator(schema)


def _strict(node: Any) -> Any:
    """The API server prunes unknown fields silently; here they are errors (a typo must not vanish)."""
    if isinstance(node, dict):
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        if node.get("x-kubernetes-int-or-string"):  # resource quantities, ports: 1, "1", "500m"
            node.pop("type", None)
            node.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
        for v in node.values():
            _strict(v)
    elif isinstance(node, list):
        for v in node:
            _strict(v)
    return node


# --- tests ---------------------------------------------------------------------------------------
@needs_kubectl
@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_overlay_renders_into_its_namespace(overlay):
    objs = render(overlay)
    assert objs, overlay
    for obj in objs:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == OVERLAYS[overlay], (overlay, obj["kind"], obj["metadata"]["name"])


@needs_kubectl
@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_core_objects_validate_against_the_kubernetes_schema(overlay):
    import kubernetes_validate

    checked = 0
    for obj in render(overlay):
        if obj["apiVersion"].startswith("ray.io/"):
            continue
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)  # raises on any error
        checked += 1
    assert checked or overlay.endswith("jobs")


@needs_kubectl
@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_ray_objects_validate_against_the_kuberay_crds(overlay):
    ray_objs = [o for o in render(overlay) if o["apiVersion"].startswith("ray.io/")]
    assert ray_objs
    for obj in ray_objs:
        assert obj["apiVersion"] == "ray.io/v1"
        errors = sorted(crd_validator(obj["kind"]).iter_errors(obj), key=lambda e: list(e.absolute_path))
        assert not errors, [f"{obj['kind']}/{obj['metadata']['name']} {'/'.join(map(str, e.absolute_path))}: {e.message}"
                            for e in errors[:10]]


def test_crd_validation_rejects_a_misspelled_field():
    obj = yaml.safe_load((K8S / "base" / "raycluster.yaml").read_text())
    assert not list(crd_validator("RayCluster").iter_errors(obj))
    obj["spec"]["headGroupSpec"]["rayStartParam"] = {"num-cpus": "0"}
    assert list(crd_validator("RayCluster").iter_errors(obj))


@needs_kubectl
def test_no_secret_values_in_the_manifests():
    for overlay, obj in all_objects():
        assert obj["kind"] != "Secret", f"{overlay}: Secret objects with values do not belong in the repo"
        if obj["kind"] == "ConfigMap":
            for key in obj.get("data") or {}:
                assert not SECRETISH.search(key), (overlay, obj["metadata"]["name"], key)
        for where, pod in pod_specs(obj):
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                for env in c.get("env", []):
                    if SECRETISH.search(env["name"]):
                        assert "value" not in env, f"{overlay} {where} {c['name']}: {env['name']} has a literal value"
                        assert "secretKeyRef" in env.get("valueFrom", {}), (overlay, where, env["name"])
    # nothing secret-looking is assigned anywhere in the source files either
    for path in K8S.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".env") and path.parent.name != "schemas":
            for line in path.read_text().splitlines():
                m = re.match(r"\s*-?\s*([A-Z][A-Z0-9_]*)\s*[=:]\s*\S", line)  # NAME=value / NAME: value
                assert not (m and SECRETISH.search(m.group(1))), f"{path}: {line.strip()}"


@needs_kubectl
def test_every_pod_runs_as_non_root_and_every_container_has_requests_and_limits():
    pods = 0
    for overlay, obj in all_objects():
        for where, pod in pod_specs(obj):
            pods += 1
            pod_ctx = pod.get("securityContext", {})
            assert pod.get("automountServiceAccountToken") is False, (overlay, where)
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                ctx = {**pod_ctx, **c.get("securityContext", {})}
                label = f"{overlay} {where} {c['name']}"
                assert ctx.get("runAsNonRoot") is True, label
                assert ctx.get("runAsUser", 1) != 0, label
                assert c.get("securityContext", {}).get("allowPrivilegeEscalation") is False, label
                assert "ALL" in c.get("securityContext", {}).get("capabilities", {}).get("drop", []), label
                res = c.get("resources", {})
                for part in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(res.get(part, {})), f"{label}: resources.{part}"
        for cs in ray_cluster_specs(obj):  # the autoscaler sidecar KubeRay adds
            if cs.get("enableInTreeAutoscaling"):
                opts = cs["autoscalerOptions"]
                assert {"cpu", "memory"} <= set(opts["resources"]["limits"]), (overlay, obj["metadata"]["name"])
                assert opts["securityContext"]["runAsNonRoot"] is True
    assert pods >= 10


@needs_kubectl
def test_images_are_pinned_by_version():
    images = set()
    for _, obj in all_objects():
        for _, pod in pod_specs(obj):
            images.update(c["image"] for c in pod.get("containers", []) + pod.get("initContainers", []))
    assert images
    for image in images:
        name, _, tag = image.rpartition("@")[0].rpartition(":") if "@" in image else image.rpartition(":")
        assert "@sha256:" in image or (tag and "/" not in tag and tag != "latest"), f"image {image!r} is not pinned"
        assert not tag.endswith("latest"), image
    assert "ray-pretrain:0.1.0-gpu" in images and "ray-pretrain:0.1.0-cpu" in images


@needs_kubectl
def test_gpu_cluster_shape_and_cpu_overlay_without_gpus():
    gpu = {o["kind"] + "/" + o["metadata"]["name"]: o for o in render("gpu") + render("gpu/jobs")}
    for key in ("RayCluster/rpt", "RayJob/rpt-train"):
        cs = ray_cluster_specs(gpu[key])[0]
        assert cs["rayVersion"] == "2.60.0"
        assert cs["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "the head schedules no work"
        assert cs["enableInTreeAutoscaling"] is True
        groups = {g["groupName"]: g for g in cs["workerGroupSpecs"]}
        g = groups["gpu-workers"]
        assert g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"] and g["maxReplicas"] >= 2
        c = g["template"]["spec"]["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert any(t["key"] == "nvidia.com/gpu" for t in g["template"]["spec"]["tolerations"])
        cpu = groups["cpu-workers"]["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in cpu["resources"]["limits"], "the Ray Data group has no GPUs"
    assert "trainer.use_gpu=true" in gpu["RayJob/rpt-train"]["spec"]["entrypoint"]
    dev = render("dev-cpu") + render("dev-cpu/jobs")
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(dev)


@needs_kubectl
def test_dashboard_and_services_stay_inside_the_cluster():
    for overlay, obj in all_objects():
        assert obj["kind"] not in ("Ingress", "Route"), overlay
        if obj["kind"] == "Service":
            assert obj["spec"].get("type", "ClusterIP") == "ClusterIP", (overlay, obj["metadata"]["name"])
        for cs in ray_cluster_specs(obj):
            assert cs["headGroupSpec"]["serviceType"] == "ClusterIP"
            assert not cs["headGroupSpec"].get("enableIngress", False)


@needs_kubectl
@pytest.mark.parametrize("env", ["dev-cpu", "gpu"])
def test_rayjob_templates_follow_kuberay_rules(env):
    jobs = {o["metadata"]["name"]: o for o in render(f"{env}/jobs") if o["kind"] == "RayJob"}
    assert set(jobs) == {"rpt-train", "rpt-tune", "rpt-continual"}
    for name, job in jobs.items():
        spec = job["spec"]
        command = name.removeprefix("rpt-")
        assert f"rpt {command} " in spec["entrypoint"] and "--address auto" in spec["entrypoint"], name
        # the config the entrypoint names ships in the image (the repository's configs/ and k8s/configs/)
        config = re.search(rf"rpt {command} (\S+)", spec["entrypoint"]).group(1)
        assert (REPO / config).is_file(), f"{name}: {config} does not exist"
        assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
        assert not set(yaml.safe_load(spec["runtimeEnvYAML"]).get("env_vars", {})) & {
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "TOKENIZERS_PARALLELISM",
            "DS_ACCELERATOR"}, f"{name}: these are set by the driver; Ray refuses a job that sets them too"
        if "clusterSelector" in spec:  # ValidateRayJobSpec of KubeRay 1.7
            assert spec["clusterSelector"]["ray.io/cluster"] == "rpt"
            assert not spec.get("suspend") and not spec.get("backoffLimit")
            assert not spec.get("shutdownAfterJobFinishes") and not spec.get("ttlSecondsAfterFinished")
            assert "rayClusterSpec" not in spec
        else:
            assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
            assert spec["backoffLimit"] >= 1
    assert "clusterSelector" not in jobs["rpt-train"]["spec"], "train creates its own cluster"


@needs_kubectl
def test_mlflow_server_uses_postgres_and_proxied_artifacts():
    objs = {o["kind"] + "/" + o["metadata"]["name"]: o for o in render("gpu")}
    args = objs["Deployment/mlflow"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--serve-artifacts" in args
    assert any(a.startswith("--backend-store-uri=postgresql") for a in args)
    assert any(a.startswith("--artifacts-destination=") for a in args)
    settings = objs["ConfigMap/rpt-settings"]["data"]
    assert settings["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert settings["RPT_STORAGE_PATH"].startswith("s3://")
    sts = objs["StatefulSet/rpt-postgres"]["spec"]
    assert sts["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    assert objs["PersistentVolumeClaim/rpt-shared"]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_kubernetes_run_configs_parse():
    from cluster.continual import load_continual
    from cluster.tune import load_tune

    tune = load_tune(str(K8S / "configs" / "tune.yaml"), [])
    assert tune.continual == "k8s/configs/continual.yaml" and tune.storage_path.startswith("/mnt/shared/")
    cont = load_continual(str(K8S / "configs" / "continual.yaml"), [])
    assert all(t.data.path.startswith("/mnt/shared/") for t in cont.tasks)
    assert cont.tracking.artifact_root.startswith("mlflow-artifacts://")


def test_cluster_launcher_yaml_validates_against_rays_schema():
    """cluster/launcher/*.yaml: the cloud-VM alternative, checked with the schema `ray up` applies."""
    import json

    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    files = sorted((REPO / "cluster" / "launcher").glob("*.yaml"))
    assert files
    for path in files:
        cfg = yaml.safe_load(path.read_text())
        jsonschema.validate(cfg, schema)
        assert cfg["docker"]["image"].rpartition(":")[2] not in ("", "latest"), path
        assert cfg["available_node_types"][cfg["head_node_type"]]["resources"].get("CPU") == 0, path
        assert "AWS_SECRET_ACCESS_KEY" not in path.read_text(), path
