"""Offline validation of the deployment files under ``infra/``: Kubernetes manifests, Serve configs, the cluster
launcher config.

- KubeRay kinds (``ray.io/v1``) against the v1 schema of their CRD in ``tests/data/kuberay-crds/`` (KubeRay
  1.7.0), made strict: every object schema that lists ``properties`` and allows nothing else explicitly
  (no ``additionalProperties``, no ``x-kubernetes-preserve-unknown-fields``) gets ``additionalProperties:
  false``, so a misspelled field fails, as the API server's strict field validation would refuse it.
- Core kinds (Deployment, Service, PersistentVolumeClaim, Secret) with ``kubernetes-validate`` in its strict mode.
- Serve configs with Ray's own ``ServeDeploySchema`` plus :func:`unknown_serve_keys`, because Serve's schema drops
  keys it does not know (an old ``max_concurrent_queries`` would silently do nothing).
- The cluster launcher config against Ray's ``ray-schema.json``, which is closed already.
"""

from __future__ import annotations

import copy
import functools
import json
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml

__all__ = [
    "CRD_FILES",
    "KUBERAY_VERSION",
    "KUBERNETES_VERSION",
    "ManifestError",
    "documents",
    "launcher_problems",
    "manifest_problems",
    "serve_config_problems",
    "strict_schema",
    "unknown_serve_keys",
    "validate_manifest",
]

REPO = Path(__file__).resolve().parents[1]
CRD_DIR = Path(__file__).parent / "data" / "kuberay-crds"
KUBERAY_VERSION = "1.7.0"
# The Kubernetes version whose core schemas kubernetes-validate checks against (KubeRay 1.7 supports it).
KUBERNETES_VERSION = "1.33.0"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
# What a manifest's metadata may hold (the CRD schemas leave metadata open; the API server knows these).
METADATA_FIELDS = {"name", "namespace", "labels", "annotations", "generateName"}


class ManifestError(ValueError):
    """A manifest that does not validate; the message lists every problem with its path."""


def documents(path: Path) -> list[dict[str, Any]]:
    """The YAML documents of ``path`` (empty ones skipped)."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def strict_schema(schema: Any) -> Any:
    """A copy of an OpenAPI v3 schema in which every object that lists ``properties`` is closed."""
    schema = copy.deepcopy(schema)
    _close(schema)
    return schema


def _close(node: Any) -> None:
    if not isinstance(node, dict):
        return
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        node["additionalProperties"] = False
    for child in node.get("properties", {}).values():
        _close(child)
    for key in ("items", "additionalProperties", "not"):
        _close(node.get(key))
    for key in ("allOf", "anyOf", "oneOf"):
        for child in node.get(key, []):
            _close(child)


@functools.cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    """A strict validator of ``kind``'s ``v1`` schema in the KubeRay CRDs."""
    if kind not in CRD_FILES:
        raise ManifestError(f"no KubeRay CRD for kind {kind!r}; known: {sorted(CRD_FILES)}")
    loader = getattr(
        yaml, "CSafeLoader", yaml.SafeLoader
    )  # the CRDs are 1 MB each: libyaml reads them 10x faster
    crd = yaml.load((CRD_DIR / CRD_FILES[kind]).read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft4Validator(strict_schema(version["schema"]["openAPIV3Schema"]))


def _where(path: Iterator[Any]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or "(top level)"


def manifest_problems(doc: dict[str, Any]) -> list[str]:
    """Every problem of one Kubernetes object against its schema (strict: unknown fields too), with its path."""
    api, kind = doc.get("apiVersion", ""), doc.get("kind", "")
    problems = []
    unknown_meta = sorted(set(doc.get("metadata", {})) - METADATA_FIELDS)
    if unknown_meta:
        problems.append(f"metadata: unknown field(s) {unknown_meta}; allowed: {sorted(METADATA_FIELDS)}")
    if api.startswith("ray.io/"):
        if api != "ray.io/v1":
            problems.append(f"apiVersion {api}: use ray.io/v1 (KubeRay {KUBERAY_VERSION})")
        else:
            validator = crd_validator(kind)
            for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
                problems.append(f"{_where(err.absolute_path)}: {err.message}")
    else:
        import kubernetes_validate

        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            problems.append(f"{_where(err.absolute_path)}: {err.message}")
        except kubernetes_validate.SchemaNotFoundError as err:
            problems.append(err.message)
    return problems


def validate_manifest(doc: dict[str, Any]) -> None:
    """Validate one Kubernetes object; raises :class:`ManifestError` naming every problem and its path."""
    problems = manifest_problems(doc)
    if problems:
        name = doc.get("metadata", {}).get("name", "?")
        raise ManifestError(f"{doc.get('kind', '')} {name}:\n  " + "\n  ".join(problems))


def unknown_serve_keys(model: type, data: Any, path: str = "") -> list[str]:
    """Keys of ``data`` that the pydantic ``model`` (a Serve schema) has no field for, recursively: the keys Serve
    would drop without a word."""
    from pydantic import BaseModel

    if not isinstance(data, dict):
        return []
    fields = model.model_fields
    names = {f.alias or n: n for n, f in fields.items()} | {n: n for n in fields}
    problems = []
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in names:
            problems.append(f"{where}: {model.__name__} has no field {key!r}")
            continue
        annotation = fields[names[key]].annotation
        problems += _check_value(annotation, value, where, BaseModel)
    return problems


def _check_value(annotation: Any, value: Any, where: str, base: type) -> list[str]:
    if isinstance(annotation, type) and issubclass(annotation, base):
        return unknown_serve_keys(annotation, value, where)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        models = [a for a in args if isinstance(a, type) and issubclass(a, base)]
        if models and isinstance(value, dict):
            return unknown_serve_keys(models[0], value, where)
        lists = [a for a in args if typing.get_origin(a) in (list, typing.List)]  # noqa: UP006
        return _check_value(lists[0], value, where, base) if lists and isinstance(value, list) else []
    if origin is typing.Annotated:
        return _check_value(args[0], value, where, base)
    if origin in (list, typing.List) and args and isinstance(value, list):  # noqa: UP006
        return [p for i, item in enumerate(value) for p in _check_value(args[0], item, f"{where}[{i}]", base)]
    return []


def serve_config_problems(data: Any) -> list[str]:
    """What is wrong with a Serve config (``serve deploy`` file or ``serveConfigV2``): Ray's schema errors, then
    the keys that schema would silently drop. Empty when it is fine."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(data)
    except ValidationError as err:
        return [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
    return unknown_serve_keys(ServeDeploySchema, data)


def launcher_problems(config: dict[str, Any]) -> list[str]:
    """What Ray's own schema of cluster launcher files (``ray-schema.json``, closed) says about ``config``."""
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{_where(e.absolute_path)}: {e.message}"
        for e in sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    ]
