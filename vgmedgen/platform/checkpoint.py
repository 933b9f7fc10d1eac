"""Checkpoint I/O without pickle: nested state (model, EMA, optimizer, RNG, step) as safetensors + JSON.

A nested state (dicts with str or int keys, lists, tensors, numbers, strings, None) is split into
its tensors, saved with safetensors under flat keys that encode the path, and everything else, saved
as JSON with the same path encoding. Loading rebuilds the structure exactly (int keys stay int, so an
optimizer's ``state_dict`` round-trips). Nothing is unpickled, so a checkpoint from an untrusted
source cannot run code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "COMPLETE",
    "CheckpointError",
    "checkpoint_step",
    "is_complete",
    "load_state",
    "mark_complete",
    "newest_complete",
    "save_state",
    "rng_state",
    "set_rng_state",
]

# Written last into a checkpoint directory: the names and sizes of every other file in it. A copy that
# stopped half-way (a worker killed during the upload) lacks it or disagrees with it.
COMPLETE = "COMPLETE.json"


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete or does not fit the model; the message names the file."""


def _encode_key(k: Any) -> str:
    if isinstance(k, bool) or not isinstance(k, (int, str)):
        raise TypeError(f"checkpoint keys must be str or int, got {type(k).__name__}")
    return f"i{k}" if isinstance(k, int) else f"s{k}"


def _decode_key(k: str) -> Any:
    return int(k[1:]) if k[0] == "i" else k[1:]


def _split(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors by {"__tensor__": key}; collect them in ``tensors``."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {
            "__dict__": [
                [_encode_key(k), _split(v, f"{path}/{_encode_key(k)}", tensors)] for k, v in obj.items()
            ]
        }
    if isinstance(obj, (list, tuple)):
        return {
            "__list__": [_split(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)],
            "tuple": isinstance(obj, tuple),
        }
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {path or '<root>'}")


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_decode_key(k): _join(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            items = [_join(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj.get("tuple") else items
    return obj


def save_state(directory: str | Path, name: str, state: Any) -> None:
    """Write ``<name>.safetensors`` and ``<name>.json`` into ``directory`` (atomically per file)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "", tensors)
    # safetensors refuses tensors that share storage; clone those (small: RNG states, tied weights).
    seen: set[int] = set()
    for k, t in tensors.items():
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        if ptr in seen:
            tensors[k] = t.clone()
        seen.add(ptr)
    for suffix, writer in (
        (".safetensors", lambda p: save_file(tensors, str(p))),
        (".json", lambda p: p.write_text(json.dumps(skeleton))),
    ):
        final = directory / f"{name}{suffix}"
        tmp = directory / f".{name}{suffix}.tmp"
        writer(tmp)
        os.replace(tmp, final)


def load_state(directory: str | Path, name: str, map_location: str | torch.device = "cpu") -> Any:
    """Read back what :func:`save_state` wrote."""
    directory = Path(directory)
    st, js = directory / f"{name}.safetensors", directory / f"{name}.json"
    for f in (st, js):
        if not f.is_file():
            raise CheckpointError(
                f"Checkpoint file {f} is missing: the checkpoint at {directory} is incomplete"
            )
    tensors = load_file(str(st), device=str(map_location))
    return _join(json.loads(js.read_text()), tensors)


def rng_state() -> dict[str, Any]:
    """Torch CPU (and CUDA, where present) RNG states, as tensors."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in state["cuda"]])


def mark_complete(directory: str | Path, step: int) -> None:
    """Write :data:`COMPLETE` (step, and every other file's size) into ``directory``: call it last."""
    directory = Path(directory)
    files = {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != COMPLETE
    }
    tmp = directory / f".{COMPLETE}.tmp"
    tmp.write_text(json.dumps({"step": int(step), "files": files}))
    os.replace(tmp, directory / COMPLETE)


def checkpoint_step(directory: str | Path) -> int | None:
    """The step of a complete checkpoint directory, or None when it is incomplete or not a checkpoint."""
    directory = Path(directory)
    try:
        marker = json.loads((directory / COMPLETE).read_text())
        for name, size in marker["files"].items():
            if (directory / name).stat().st_size != size:
                return None
        return int(marker["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_complete(directory: str | Path) -> bool:
    return checkpoint_step(directory) is not None


def newest_complete(root: str | Path, pattern: str = "checkpoint_*") -> tuple[int, Path] | None:
    """The complete checkpoint directory under ``root`` with the highest step, as ``(step, path)``."""
    found = []
    for d in Path(root).glob(pattern):
        step = checkpoint_step(d) if d.is_dir() else None
        if step is not None:
            found.append((step, d))
    return max(found, key=lambda x: (x[0], str(x[1]))) if found else None
