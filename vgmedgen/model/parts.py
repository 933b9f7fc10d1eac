"""A model version's files without the model: manifests (content hashes of every file of a part or a
version) and the visual and text parts' save/load.

Kept apart from :mod:`vgmedgen.model.vgmedgen` (which re-exports it) so that the visual and align stages,
which never build the generator, import no diffusers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub.utils.sha import sha_fileobj
from safetensors.torch import load_file, save_file
from torch import nn

from vgmedgen.model.text import TextConfig, TextDisentangler, TextEncoder
from vgmedgen.model.visual import VisualConfig, VisualDisentangler

__all__ = [
    "MODEL_CARD",
    "ModelVersionError",
    "load_text",
    "load_visual",
    "save_text",
    "save_visual",
    "verify_manifest",
    "write_manifest",
]


# The model card of a version: documentation that grows as the version is measured, so it lies outside
# the manifest's hashes (the version's identity, the sha256 of manifest.json, stays that of its weights).
MODEL_CARD = "MODEL_CARD.md"


class ModelVersionError(FileNotFoundError):
    """A model version (or one of its parts) is missing, altered or does not fit its config."""


# ---------------------------------------------------------------------------------------------
# Manifests: content hashes of every file of a part or a model version
# ---------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return sha_fileobj(f).hex()  # the hub's own chunked sha256


def write_manifest(directory: Path, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``manifest.json`` with the sha256 of every other file under ``directory`` (the model card
    at its top level excepted: see :data:`MODEL_CARD`)."""
    directory = Path(directory)
    files = {
        str(p.relative_to(directory)): _sha256(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != "manifest.json" and p != directory / MODEL_CARD
    }
    manifest = {"files": files, **(extra or {})}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def verify_manifest(directory: Path) -> dict[str, Any]:
    """Check every file listed in ``manifest.json`` exists with its recorded hash."""
    directory = Path(directory)
    path = directory / "manifest.json"
    if not path.is_file():
        raise ModelVersionError(f"{directory} is not a saved model part or version: manifest.json is missing")
    try:
        manifest = json.loads(path.read_text())
        files = dict(manifest["files"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelVersionError(
            f"{path} is not a valid manifest ({exc}); the model version is corrupted"
        ) from None
    for rel, digest in files.items():
        f = directory / rel
        if not f.is_file():
            raise ModelVersionError(f"{f} is listed in {path} but missing; the model version is incomplete")
        if _sha256(f) != digest:
            raise ModelVersionError(
                f"{f} does not match its hash in {path}: the file was changed or corrupted"
            )
    return manifest


def _load_tensors(path: Path, module: nn.Module, what: str, strict: bool = True) -> None:
    if not path.is_file():
        raise ModelVersionError(f"{what} weights {path} are missing")
    tensors = load_file(str(path))
    own = module.state_dict()
    for name, t in tensors.items():
        if name in own and own[name].shape != t.shape:
            raise ModelVersionError(
                f"{path}: tensor {name!r} has shape {tuple(t.shape)} but the model expects {tuple(own[name].shape)}; "
                "the weights were saved with a different config"
            )
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    if unexpected or (strict and missing):
        raise ModelVersionError(
            f"{path} does not fit the {what} config: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )


# ---------------------------------------------------------------------------------------------
# The three parts
# ---------------------------------------------------------------------------------------------


def save_visual(model: VisualDisentangler, directory: Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        str(directory / "model.safetensors"),
    )
    (directory / "config.json").write_text(model.config.model_dump_json(indent=2))
    write_manifest(directory, {"part": "visual"})


def load_visual(directory: Path, config: VisualConfig | None = None) -> VisualDisentangler:
    directory = Path(directory)
    verify_manifest(directory)
    config = config or VisualConfig.model_validate_json((directory / "config.json").read_text())
    model = VisualDisentangler(config)
    _load_tensors(directory / "model.safetensors", model, "visual disentangler")
    return model.eval()


def save_text(model: TextDisentangler, directory: Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.encoder.save_pretrained(directory / "encoder")
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.heads.state_dict().items()},
        str(directory / "heads.safetensors"),
    )
    (directory / "config.json").write_text(model.config.model_dump_json(indent=2))
    write_manifest(directory, {"part": "text"})


def load_text(directory: Path, config: TextConfig | None = None) -> TextDisentangler:
    directory = Path(directory)
    verify_manifest(directory)
    config = config or TextConfig.model_validate_json((directory / "config.json").read_text())
    encoder = TextEncoder.from_pretrained(
        directory / "encoder", max_length=config.max_length, frozen=config.frozen
    )
    model = TextDisentangler(config, encoder)
    _load_tensors(directory / "heads.safetensors", model.heads, "text heads")
    return model.eval()
