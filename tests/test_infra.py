"""The deployment files under infra/, offline (no Kubernetes, no Ray cluster): every manifest validates strictly
against the KubeRay 1.7.0 CRDs or the core Kubernetes schemas, the Serve configs against Serve's schema plus an
unknown-key check, the cluster launcher against Ray's schema; RayJob entrypoints are runnable commands whose
configs load; versions, images, storage, tokens and the MLflow address agree everywhere; the Dockerfile follows
the lock."""

from __future__ import annotations

import copy
import importlib.util
import re
import shlex
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from manifests import (
    ManifestError,
    documents,
    launcher_problems,
    manifest_problems,
    serve_config_problems,
    validate_manifest,
)

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
KUBERAY = INFRA / "kuberay"
MANIFEST_FILES = sorted(KUBERAY.glob("*.yaml"))
SHARED_PVC = "vgmedgen-shared"
SECRET = "vgmedgen-secrets"
JOBS = ("prepare", "train", "generate", "sweep")


def _lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


LOCK = _lock()
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
IMAGE = f"vgmedgen:{PROJECT['version']}-ray{LOCK['ray']}"


def _all() -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, d) for p in MANIFEST_FILES for d in documents(p)]


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in _all() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} under infra/kuberay/, found {len(found)}"
    return found[0]


def _rayjobs() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"].removeprefix("vgmedgen-"): d for _, d in _all() if d["kind"] == "RayJob"}


def _cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """Every RayCluster spec: the RayCluster's own, each RayJob's rayClusterSpec, the RayService's."""
    specs = []
    for _, d in _all():
        name = f"{d['kind']} {d['metadata']['name']}"
        if d["kind"] == "RayCluster":
            specs.append((name, d["spec"]))
        elif d["kind"] == "RayJob":
            specs.append((name, d["spec"]["rayClusterSpec"]))
        elif d["kind"] == "RayService":
            specs.append((name, d["spec"]["rayClusterConfig"]))
    return specs


def _pod_templates(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# --- schemas ---------------------------------------------------------------------------------------------------


def test_infra_holds_the_whole_set_and_no_stale_rayjob() -> None:
    kinds = sorted((d["kind"], d["metadata"]["name"]) for _, d in _all())
    assert kinds == sorted(
        [("RayCluster", "vgmedgen"), ("RayService", "vgmedgen"), ("Deployment", "vgmedgen-mlflow"),
         ("Service", "vgmedgen-mlflow"), ("PersistentVolumeClaim", "vgmedgen-mlflow-db"),
         ("PersistentVolumeClaim", SHARED_PVC), ("Secret", SECRET)]
        + [("RayJob", f"vgmedgen-{job}") for job in JOBS]
    )  # fmt: skip
    assert not (INFRA / "rayjob.yaml").exists()
    assert sorted(p.name for p in INFRA.glob("*.y*ml")) == [
        "cluster-launcher.yaml",
        "runtime_env.yaml",
        "serve.yaml",
    ]


@pytest.mark.parametrize(("file", "doc"), _all(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_every_manifest_validates_strictly(file: str, doc: dict[str, Any]) -> None:
    assert manifest_problems(doc) == [], f"{file}: {doc['kind']}"


def _rename(doc: dict[str, Any], path: list[Any], new_key: str) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    node = doc
    for step in path[:-1]:
        node = node[step]
    node[new_key] = node.pop(path[-1])
    return doc


@pytest.mark.parametrize(
    ("kind", "name", "path", "typo"),
    [
        ("RayCluster", None, ["spec", "workerGroupSpecs", 1, "maxReplicas"], "maxReplica"),
        ("RayCluster", None, ["spec", "enableInTreeAutoscaling"], "enableInTreeAutoScaling"),
        ("RayCluster", None, ["spec", "headGroupSpec", "template", "spec", "containers", 0, "volumeMounts"], "volumeMount"),
        ("RayJob", "vgmedgen-train", ["spec", "shutdownAfterJobFinishes"], "shutdownAfterJobFinish"),
        ("RayJob", "vgmedgen-train", ["spec", "rayClusterSpec", "workerGroupSpecs", 0, "groupName"], "group"),
        ("RayService", None, ["spec", "serveConfigV2"], "serveConfig"),
        ("Deployment", None, ["spec", "template", "spec", "containers", 0, "readinessProbe"], "readynessProbe"),
        ("Service", None, ["spec", "selector"], "selectors"),
        ("PersistentVolumeClaim", SHARED_PVC, ["spec", "accessModes"], "accessMode"),
        ("Secret", None, ["stringData"], "stringdata"),
        ("RayJob", "vgmedgen-sweep", ["metadata", "labels"], "lables"),
    ],
)  # fmt: skip
def test_a_misspelled_field_fails_naming_it(kind: str, name: str | None, path: list[Any], typo: str) -> None:
    doc = _one(kind, name)
    validate_manifest(doc)
    with pytest.raises(ManifestError, match=re.escape(typo)):
        validate_manifest(_rename(doc, path, typo))


@pytest.mark.parametrize(
    ("path", "value", "words"),
    [
        (["spec", "workerGroupSpecs", 1, "minReplicas"], "0", "is not of type 'integer'"),
        (["spec", "headGroupSpec", "rayStartParams", "num-cpus"], 0, "is not of type 'string'"),
        (["spec", "authOptions", "mode"], "tokens", "is not one of"),
    ],
)
def test_a_wrong_value_fails(path: list[Any], value: Any, words: str) -> None:
    doc = copy.deepcopy(_one("RayCluster"))
    node = doc
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    with pytest.raises(ManifestError, match=words):
        validate_manifest(doc)


# --- the cluster: one spec, versions, images, resources, storage, tokens ----------------------------------------


def test_every_ray_cluster_is_the_rayclusters_spec() -> None:
    """The RayJobs and the RayService carry raycluster.yaml's spec; the RayService adds only the Serve token."""
    reference = _one("RayCluster")["spec"]
    for name, job in _rayjobs().items():
        assert job["spec"]["rayClusterSpec"] == reference, (
            f"rayjob-{name}.yaml's rayClusterSpec drifted from raycluster.yaml"
        )
    service = copy.deepcopy(_one("RayService")["spec"]["rayClusterConfig"])
    for template in _pod_templates(service):
        for container in template["spec"]["containers"]:
            token = [e for e in container["env"] if e["name"] == "VGMEDGEN_SERVE_TOKEN"]
            assert token == [
                {
                    "name": "VGMEDGEN_SERVE_TOKEN",
                    "valueFrom": {"secretKeyRef": {"name": SECRET, "key": "serve_token"}},
                }
            ], f"{container['name']} of the RayService lacks the Serve token from the Secret"
            container["env"].remove(token[0])
    assert service == reference, "rayservice.yaml's rayClusterConfig drifted from raycluster.yaml"


def test_ray_version_image_autoscaling_gpu_and_auth() -> None:
    secret = _one("Secret")
    for name, spec in _cluster_specs():
        assert spec["rayVersion"] == LOCK["ray"], name
        assert spec["enableInTreeAutoscaling"] is True, name
        assert spec["authOptions"] == {"mode": "token", "secretName": secret["metadata"]["name"]}, name
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", name  # drivers only on the head
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        gpu = groups["gpu"]
        assert (
            0 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
            and gpu["maxReplicas"] > gpu["minReplicas"]
        )
        (worker,) = gpu["template"]["spec"]["containers"]
        assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1, name
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in head["resources"]["limits"], name
        for template in _pod_templates(spec):
            pod = template["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
            for container in pod["containers"]:
                assert container["image"] == IMAGE, f"{name}: {container['image']} is not {IMAGE}"
                res = container["resources"]
                assert res["requests"] == res["limits"], (
                    f"{name} {container['name']}: requests must equal limits"
                )
    assert set(secret["stringData"]) == {"auth_token", "serve_token"}


def test_every_image_is_the_dockerfiles_tag_never_latest() -> None:
    images = {c["image"] for _, d in _all() for c in _containers(d)}
    assert images == {IMAGE}
    launcher = yaml.safe_load((INFRA / "cluster-launcher.yaml").read_text())
    assert launcher["docker"]["image"].rsplit("/", 1)[-1] == IMAGE
    assert f"-t {IMAGE} " in (INFRA / "Dockerfile").read_text()


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "Deployment":
        return doc["spec"]["template"]["spec"]["containers"]
    specs = {
        "RayCluster": ["spec"],
        "RayJob": ["spec", "rayClusterSpec"],
        "RayService": ["spec", "rayClusterConfig"],
    }
    if doc["kind"] not in specs:
        return []
    spec = doc
    for key in specs[doc["kind"]]:
        spec = spec[key]
    return [c for t in _pod_templates(spec) for c in t["spec"]["containers"]]


def test_shared_storage_is_rwx_and_mounted_where_jobs_write_and_mlflow_is_reachable() -> None:
    pvc = _one("PersistentVolumeClaim", SHARED_PVC)
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    mlflow = _one("Deployment", "vgmedgen-mlflow")
    service = _one("Service", "vgmedgen-mlflow")
    (port,) = service["spec"]["ports"]
    tracking_uri = f"http://{service['metadata']['name']}:{port['port']}"
    for _, doc in _all():
        if doc["kind"] not in ("RayCluster", "RayJob", "RayService"):
            continue
        for container in _containers(doc):
            env = _env(container)
            mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
            shared = mounts["shared"]
            assert env["VGMEDGEN_OUTPUT_ROOT"].startswith(shared + "/"), container["name"]
            assert env["MLFLOW_TRACKING_URI"] == tracking_uri, container["name"]
    pods = [t["spec"] for _, s in _cluster_specs() for t in _pod_templates(s)] + [
        mlflow["spec"]["template"]["spec"]
    ]
    for pod in pods:
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == SHARED_PVC

    # The server: its Service selects it, it listens on the Service's port, allows the Service's host name, keeps
    # the database on its own volume and the artifacts on the shared one.
    template = mlflow["spec"]["template"]
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    (container,) = template["spec"]["containers"]
    args = dict(a.removeprefix("--").split("=", 1) for a in container["command"][2:])
    assert container["command"][:2] == ["mlflow", "server"] and args["workers"] == "1"
    assert int(args["port"]) == container["ports"][0]["containerPort"] and args["host"] == "0.0.0.0"
    assert f"{service['metadata']['name']}:{port['port']}" in args["allowed-hosts"].split(",")
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert args["backend-store-uri"].startswith(f"sqlite:///{mounts['db']}/")
    assert args["artifacts-destination"].startswith(mounts["shared"] + "/")
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert volumes["db"]["persistentVolumeClaim"]["claimName"] == "vgmedgen-mlflow-db"
    assert _one("PersistentVolumeClaim", "vgmedgen-mlflow-db")["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert (
        mlflow["spec"]["replicas"] == 1 and mlflow["spec"]["strategy"]["type"] == "Recreate"
    )  # one SQLite writer
    assert _env(container)["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


# --- RayJobs: the commands users run, with configs that load --------------------------------------------------


def _job_env(job: dict[str, Any]) -> dict[str, str]:
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    return {k: v for k, v in _env(head).items() if isinstance(v, str)}


@pytest.mark.parametrize("job", JOBS)
def test_rayjob_entrypoint_is_the_local_command_and_its_config_loads(
    job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vgmedgen.platform.cli import job_parser
    from vgmedgen.platform.config import load_experiment
    from vgmedgen.platform.tuning.config import load_sweep

    manifest = _rayjobs()[job]
    argv = shlex.split(manifest["spec"]["entrypoint"])
    assert argv[:2] == ["python", f"jobs/{job}.py"] and (REPO / argv[1]).is_file()
    args = job_parser("").parse_args(argv[2:])
    assert args.config and (REPO / args.config).is_file(), f"{args.config} does not exist"
    # The job runs with the pods' environment (the output root comes from there when the command has none).
    for key, value in _job_env(manifest).items():
        monkeypatch.setenv(key, value)
    if job == "sweep":
        assert args.config.startswith("configs/sweeps/")
        cfg = load_sweep(REPO / args.config, args.overrides).base
    else:
        cfg = load_experiment(REPO / args.config, args.overrides)
        assert f"output_root={cfg.root}" in args.overrides  # explicit, as the README's cluster commands
    assert str(cfg.root).startswith("/shared/"), f"{job} writes to {cfg.root}, not the shared volume"
    assert manifest["spec"]["shutdownAfterJobFinishes"] is True


def test_rayjob_runtime_env_is_infra_runtime_env_without_the_upload() -> None:
    local = yaml.safe_load((INFRA / "runtime_env.yaml").read_text())
    for name, job in _rayjobs().items():
        runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
        assert runtime_env == {"env_vars": local["env_vars"]}, name  # code is in the image: no working_dir


def test_a_rayjob_entrypoint_with_a_bad_override_is_refused() -> None:
    from vgmedgen.model.configbase import ConfigError
    from vgmedgen.platform.cli import job_parser
    from vgmedgen.platform.config import load_experiment

    argv = shlex.split(_rayjobs()["train"]["spec"]["entrypoint"]) + ["train.scaling.num_worker=4"]
    args = job_parser("").parse_args(argv[2:])
    with pytest.raises(ConfigError, match="num_worker"):
        load_experiment(REPO / args.config, args.overrides)


# --- Serve --------------------------------------------------------------------------------------------------


def _serve_configs() -> tuple[dict[str, Any], dict[str, Any]]:
    local = yaml.safe_load((INFRA / "serve.yaml").read_text())
    service = yaml.safe_load(_one("RayService")["spec"]["serveConfigV2"])
    return local, service


def test_serve_configs_pass_serves_schema_and_our_unknown_key_check() -> None:
    from vgmedgen.platform.config import load_experiment
    from vgmedgen.serve.app import ServeArgs

    local, service = _serve_configs()
    assert serve_config_problems(local) == [] and serve_config_problems(service) == []
    assert service["applications"] == local["applications"], (
        "serveConfigV2 must embed infra/serve.yaml's applications"
    )
    assert local["http_options"]["host"] == "127.0.0.1" and service["http_options"]["host"] == "0.0.0.0"
    assert service["http_options"]["port"] == local["http_options"]["port"]
    head = _one("RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][
        0
    ]
    assert {"containerPort": service["http_options"]["port"], "name": "serve"} in head["ports"]
    for app in service["applications"]:
        args = ServeArgs.model_validate(app["args"])
        cfg = load_experiment(REPO / args.config, args.overrides)
        assert cfg.serve.port == service["http_options"]["port"] and cfg.serve.app_name == app["name"]
        # on 0.0.0.0 the token is required: the builder reads it from the variable the pods get from the Secret
        assert cfg.serve.token_env == "VGMEDGEN_SERVE_TOKEN" and cfg.serve.token_file is None
        assert "VGMEDGEN_SERVE_TOKEN" in _env(head)


@pytest.mark.parametrize(
    ("where", "key"),
    [
        ("deployment", "max_concurrent_queries"),
        ("application", "route"),
        ("http_options", "hots"),
        ("top", "proxy_locations"),
    ],
)
def test_a_key_serve_would_drop_fails_our_check(where: str, key: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    for config in _serve_configs():
        bad = copy.deepcopy(config)
        app = bad["applications"][0]
        if where == "deployment":
            target = app.setdefault("deployments", [{"name": "ModelServer"}])[0]
        elif where == "application":
            target = app
        elif where == "http_options":
            target = bad["http_options"]
        else:
            target = bad
        target[key] = 5
        ServeDeploySchema.model_validate(bad)  # Serve itself accepts it and drops the key
        problems = serve_config_problems(bad)
        assert len(problems) == 1 and key in problems[0], problems


def test_a_bad_serve_value_fails_serves_own_schema() -> None:
    local, _ = _serve_configs()
    bad = copy.deepcopy(local)
    bad["proxy_location"] = "Everywhere"
    assert any("proxy_location" in p for p in serve_config_problems(bad))


# --- the cluster launcher, the Dockerfile and the lock ------------------------------------------------------


def test_cluster_launcher_validates_against_rays_schema_and_uses_the_image_and_storage() -> None:
    config = yaml.safe_load((INFRA / "cluster-launcher.yaml").read_text())
    assert launcher_problems(config) == []
    options = " ".join(config["docker"]["run_options"])
    assert "-v /shared:/shared" in options and "--env VGMEDGEN_OUTPUT_ROOT=/shared/vgmedgen" in options
    assert "--env RAY_AUTH_MODE=token" in options
    assert config["setup_commands"] == []  # the image holds the environment
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert starts.count("MLFLOW_TRACKING_URI=") == 2 and "mlflow server" in starts
    bad = copy.deepcopy(config)
    bad["head_start_ray_command"] = bad.pop("head_start_ray_commands")
    assert any("head_start_ray_command" in p for p in launcher_problems(bad))
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu"]["max_worker"] = 2
    assert any("max_worker" in p for p in launcher_problems(bad))


def test_dockerfile_base_is_the_locked_ray_and_python_and_installs_with_the_lock() -> None:
    text = (INFRA / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    match = re.fullmatch(r"rayproject/ray:(?P<ray>[\d.]+)-py(?P<py>\d)(?P<minor>\d+)(-\w+)?", base)
    assert match, f"FROM {base}: expected rayproject/ray:<ray version>-py<python>[-variant]"
    assert match["ray"] == LOCK["ray"]
    python = f"{match['py']}.{match['minor']}"
    assert (
        python == f"{sys.version_info.major}.{sys.version_info.minor}"
    )  # the lock was resolved on this Python
    assert f">={python}," in PROJECT["requires-python"]
    installs = [line for line in text.replace("\\\n", " ").splitlines() if "pip install" in line]
    assert installs and all("-c constraints.txt" in line for line in installs), installs
    for name, version in re.findall(r"([A-Za-z0-9_.\-]+)==([\w.]+)", text):
        assert LOCK.get(name.lower().replace("_", "-")) == version, (
            f"Dockerfile pins {name}=={version}, not the lock's"
        )
    assert "infra/check_lock.py constraints.txt" in text
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1] not in ("root", "0"), "the image must end as a non-root user"


def _check_lock():
    spec = importlib.util.spec_from_file_location("check_lock", INFRA / "check_lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lock_check_passes_here_and_catches_a_drift(tmp_path: Path) -> None:
    """The image's build-time check, run on this virtualenv (installed from the same lock, dev extra included)."""
    check = _check_lock()
    lock = check.read_lock(REPO / "constraints.txt")
    assert check.differences(lock, ["vgmedgen[dev]"]) == []
    assert lock["kubernetes-validate"] and lock["importlib-resources"]  # the validator and its dependencies
    drifted = {**lock, "ray": "2.59.0"}
    del drifted["pyyaml"]
    problems = check.differences(drifted, ["vgmedgen"])
    assert f"ray: installed {LOCK['ray']}, the lock pins 2.59.0" in problems
    assert any(p.startswith("pyyaml==") and "not pinned" in p for p in problems)


# --- the docs -----------------------------------------------------------------------------------------------


def test_every_infra_file_the_cluster_docs_name_exists() -> None:
    text = (REPO / "docs" / "cluster.md").read_text()
    named = set(re.findall(r"\binfra/[\w./-]+\.(?:ya?ml|py)\b|\binfra/Dockerfile\b", text))
    assert {"infra/kuberay/raycluster.yaml", "infra/cluster-launcher.yaml", "infra/Dockerfile"} <= named
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, f"docs/cluster.md names files that do not exist: {missing}"
