"""KubeRay manifests checked offline: our own JSON schema for the RayCluster/RayJob subset we use
(deploy/kuberay/schema/), the embedded pod templates against the Kubernetes core schema
(kubernetes-validate ships it), and the links between the manifests and the rest of the repo."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from _deploy_helpers import DEPLOY, ROOT, SETUP_HINT

KUBERAY = DEPLOY / "kuberay"
SCHEMA = KUBERAY / "schema" / "kuberay-v1-subset.schema.json"


def _load(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


@pytest.fixture(scope="module")
def validator():
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _errors(validator, doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.fixture(scope="module")
def kubernetes_validate():
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail(f"kubernetes-validate is not installed in the virtualenv: {SETUP_HINT}")
    return kubernetes_validate


def _pod_templates(doc: dict) -> dict[str, dict]:
    spec = doc["spec"]
    out = {}
    cluster = spec if doc["kind"] == "RayCluster" else spec.get("rayClusterSpec")
    if cluster:
        out["head"] = cluster["headGroupSpec"]["template"]
        for group in cluster.get("workerGroupSpecs", []):
            out[f"worker {group['groupName']}"] = group["template"]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in spec:
        out["submitter"] = spec["submitterPodTemplate"]
    return out


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_manifest_matches_schema(validator, name):
    assert _errors(validator, _load(name)) == []


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_pod_templates_match_kubernetes_core_schema(kubernetes_validate, name):
    version = kubernetes_validate.latest_version()
    for where, template in _pod_templates(_load(name)).items():
        obj = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name} {where}: {e}")


def _mutations():
    def typo_in_worker_group(d):
        g = d["spec"]["workerGroupSpecs"][0]
        g["minReplica"] = g.pop("minReplicas")

    def typo_in_head(d):
        d["spec"]["headGroupSpec"]["rayStartParam"] = d["spec"]["headGroupSpec"].pop("rayStartParams")

    def typo_in_container(d):
        c = d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
        c["resource"] = c.pop("resources")

    def numeric_start_param(d):
        d["spec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0

    def bad_quantity(d):
        c = d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
        c["resources"]["limits"]["nvidia.com/gpu"] = "eight"

    def wrong_api_version(d):
        d["apiVersion"] = "ray.io/v1alpha1"

    def typo_in_job(d):
        d["spec"]["entryPoint"] = d["spec"].pop("entrypoint")

    def job_without_cluster(d):
        del d["spec"]["clusterSelector"]

    def job_deletes_shared_cluster(d):
        d["spec"]["shutdownAfterJobFinishes"] = True

    cluster = [typo_in_worker_group, typo_in_head, typo_in_container, numeric_start_param, bad_quantity, wrong_api_version]
    job = [typo_in_job, job_without_cluster, job_deletes_shared_cluster]
    return [("raycluster.yaml", m) for m in cluster] + [("rayjob.yaml", m) for m in job]


@pytest.mark.parametrize("name, mutate", _mutations(), ids=lambda v: getattr(v, "__name__", v))
def test_schema_rejects_a_mutated_manifest(validator, name, mutate):
    doc = copy.deepcopy(_load(name))
    mutate(doc)
    assert _errors(validator, doc), f"{mutate.__name__} passed the schema"


def test_kubernetes_validate_rejects_a_typo_in_a_pod_template(kubernetes_validate):
    template = copy.deepcopy(_load("raycluster.yaml")["spec"]["headGroupSpec"]["template"])
    template["spec"]["containers"][0]["imagePulPolicy"] = template["spec"]["containers"][0].pop("imagePullPolicy")
    obj = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


def test_manifests_fit_together():
    cluster, job = _load("raycluster.yaml"), _load("rayjob.yaml")
    assert cluster["apiVersion"] == job["apiVersion"] == "ray.io/v1"
    # the job runs on this cluster, the GPU recipe's config, with the aepo console script
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["aepo", "train"]
    config = entry[entry.index("--config") + 1]
    assert config == "deploy/configs/gpu_qwen25_math_7b_dapo.yaml" and (ROOT / config).is_file()
    # GPU workers ask for GPUs; the head does not
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    images = set()
    for group in cluster["spec"]["workerGroupSpecs"]:
        (c,) = group["template"]["spec"]["containers"]
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1, group["groupName"]
        images.add(c["image"])
    # metrics: the head's annotation finds the driver exporter, workers expose Ray's metrics port
    head_ann = head["template"]["metadata"]["annotations"]
    assert head_ann["prometheus.io/port"] == "9400"
    (head_c,) = head["template"]["spec"]["containers"]
    assert {p["containerPort"] for p in head_c["ports"]} >= {8265, 8080, 9400, 6379}
    for group in cluster["spec"]["workerGroupSpecs"]:
        assert group["template"]["metadata"]["annotations"]["prometheus.io/port"] == group["rayStartParams"]["metrics-export-port"]
    images |= {head_c["image"], job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"]}
    assert len(images) == 1, f"one project image everywhere, got {images}"
