"""KubeRay manifests checked offline: our own JSON schema for the RayCluster/RayJob subset we use
(deploy/kuberay/schema/), the embedded pod templates and redis.yaml's Deployment and Service against
the Kubernetes core schema (kubernetes-validate ships it), and the links between the manifests and
the rest of the repo (the recipes' controller.redis_url names redis.yaml's Service)."""

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


# --------------------------------------------------------------------------- the Redis of redis.yaml


def _redis_docs() -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all((KUBERAY / "redis.yaml").read_text())}


def _recipe_redis_urls() -> dict[str, str]:
    """controller.redis_url of every config that sets one, as the files have it."""
    urls = {}
    for path in sorted((DEPLOY / "configs").glob("*.yaml")):
        url = ((yaml.safe_load(path.read_text()) or {}).get("controller") or {}).get("redis_url")
        if url:
            urls[path.name] = url
    return urls


def _redis_problems(docs: dict[str, dict], url: str) -> list[str]:
    """What keeps `url` from reaching the Redis of `docs` (a Deployment and a Service), or keeps
    that Redis from being the one the controller needs: durable writes, a readiness that means
    it answers, resources requested."""
    from urllib.parse import urlparse

    target, problems = urlparse(url), []
    svc, dep = docs.get("Service"), docs.get("Deployment")
    if svc is None or dep is None:
        return [f"redis.yaml holds {sorted(docs)}, not a Deployment and a Service"]
    pod = dep["spec"]["template"]
    labels = pod["metadata"].get("labels", {})
    (c,) = pod["spec"]["containers"]
    if svc["metadata"]["name"] != target.hostname:
        problems.append(f"Service {svc['metadata']['name']!r} is not {target.hostname!r}, the host of {url}")
    if svc["spec"].get("type", "ClusterIP") != "ClusterIP":
        problems.append(f"Service type {svc['spec']['type']}: the controller reaches it inside the cluster")
    port = next((p for p in svc["spec"]["ports"] if p["port"] == (target.port or 6379)), None)
    names = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    if port is None:
        problems.append(f"the Service has no port {target.port or 6379} ({url})")
    elif names.get(port.get("targetPort"), port.get("targetPort", port["port"])) != 6379:
        problems.append(f"the Service's targetPort {port.get('targetPort')!r} is not the container's port 6379")
    if not svc["spec"].get("selector") or any(labels.get(k) != v for k, v in svc["spec"]["selector"].items()):
        problems.append(f"the Service's selector {svc['spec'].get('selector')} does not select the Redis pod {labels}")
    if any(labels.get(k) != v for k, v in dep["spec"]["selector"]["matchLabels"].items()):
        problems.append("the Deployment's selector does not match its own pod template")
    if not c["image"].startswith("redis:7"):
        problems.append(f"image {c['image']}, not redis:7")
    args = " ".join(c.get("command", []) + c.get("args", []))
    if "--appendonly yes" not in args:
        problems.append(f"Redis runs without --appendonly yes: {args!r}")
    if (c.get("readinessProbe") or {}).get("exec", {}).get("command") != ["redis-cli", "ping"]:
        problems.append("no readiness probe `redis-cli ping`")
    if not {"cpu", "memory"} <= set((c.get("resources") or {}).get("requests", {})):
        problems.append("no cpu and memory requests")
    mounts = {m["name"] for m in c.get("volumeMounts", []) if m["mountPath"] == "/data"}
    if not mounts & {v["name"] for v in pod["spec"].get("volumes", [])}:
        problems.append("no volume at /data, where the append-only file is written")
    return problems


def test_the_recipes_redis_url_reaches_the_shipped_redis():
    urls = _recipe_redis_urls()
    assert {"gpu_qwen25_math_7b_dapo.yaml", "gpu_qwen25_math_7b_dapo_split.yaml"} <= set(urls)
    docs = _redis_docs()
    for name, url in urls.items():
        assert _redis_problems(docs, url) == [], name
    # the Ray pods' REDIS_URL is the same Redis
    for where, template in _pod_templates(_load("raycluster.yaml")).items():
        env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0].get("env", [])}
        assert env.get("REDIS_URL") in set(urls.values()), where
    # and no Ray pod is selected by the Redis Service (both carry app.kubernetes.io/name: aepo-ray)
    selector = docs["Service"]["spec"]["selector"]
    for where, template in _pod_templates(_load("raycluster.yaml")).items():
        assert any(template["metadata"]["labels"].get(k) != v for k, v in selector.items()), where


def test_redis_manifest_matches_kubernetes_core_schema(kubernetes_validate):
    version = kubernetes_validate.latest_version()
    for kind, doc in _redis_docs().items():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"redis.yaml {kind}: {e}")


def test_kubernetes_validate_rejects_a_typo_in_the_redis_deployment(kubernetes_validate):
    dep = copy.deepcopy(_redis_docs()["Deployment"])
    c = dep["spec"]["template"]["spec"]["containers"][0]
    c["readinesProbe"] = c.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, kubernetes_validate.latest_version(), strict=True)


def _redis_mutations():
    def renamed_service(d):
        d["Service"]["metadata"]["name"] = "redis-master"

    def other_port(d):
        d["Service"]["spec"]["ports"][0]["port"] = 6380

    def wrong_target_port(d):
        d["Service"]["spec"]["ports"][0]["targetPort"] = "http"

    def selector_misses_the_pod(d):
        d["Service"]["spec"]["selector"]["app.kubernetes.io/component"] = "cache"

    def no_append_only(d):
        d["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"] = ["redis-server"]

    def no_readiness(d):
        del d["Deployment"]["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]

    def no_requests(d):
        del d["Deployment"]["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]

    def no_service(d):
        del d["Service"]

    return [renamed_service, other_port, wrong_target_port, selector_misses_the_pod, no_append_only, no_readiness,
            no_requests, no_service]


@pytest.mark.parametrize("mutate", _redis_mutations(), ids=lambda m: m.__name__)
def test_a_mutated_redis_manifest_no_longer_serves_the_recipe(mutate):
    docs = copy.deepcopy(_redis_docs())
    mutate(docs)
    assert _redis_problems(docs, _recipe_redis_urls()["gpu_qwen25_math_7b_dapo.yaml"]), mutate.__name__


def test_a_recipe_pointing_elsewhere_is_caught():
    assert _redis_problems(_redis_docs(), "redis://controller-state:6379/0")
    assert _redis_problems(_redis_docs(), "redis://redis:6380/0")
