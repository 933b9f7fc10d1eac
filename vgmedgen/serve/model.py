"""The model deployment: loads model versions (``@serve.multiplexed``, least recently used leave first)
and samples requests in dynamic batches (``@serve.batch``) that count images, not requests.

A call is a :class:`Chunk`: one sample request (at most ``max_batch_size`` images; the ingress splits
bigger ones), its model version and, for a reference request, the reference's pixels. Serve groups
calls for the same model version into a batch; :func:`generate_samples` then samples requests with the
same steps and way of conditioning together, each row with its own guidance, so requests that differ
only in guidance share a sampler batch.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from ray import serve
from ray.serve.metrics import Counter, Histogram

from vgmedgen.platform.generation.request import SampleRequest
from vgmedgen.platform.generation.sample import generate_samples, load_model
from vgmedgen.platform.images import png_bytes, provenance_fields

__all__ = ["Chunk", "ChunkResult", "ModelServer"]


@dataclass
class Chunk:
    """One call to the model deployment.

    Attributes:
        request: what to sample (its ``reference``, if any, is a placeholder for ``reference_pixels``).
        model_id: the version id (the multiplexing key).
        model_path: the version's directory, as the server's catalog resolved it.
        reference_pixels: (H, W, 3) uint8 of a reference request.
        return_masks: whether the pseudo-masks are wanted.
    """

    request: SampleRequest
    model_id: str
    model_path: str
    reference_pixels: np.ndarray | None = None
    return_masks: bool = False


@dataclass
class ChunkResult:
    """The images of a :class:`Chunk`, in seed order.

    Attributes:
        images: (n, H, W, 3) uint8.
        masks: (n, H, W) uint8 0/255, or None.
        seeds: each image's seed.
        settings: the sampler settings used (``num_steps``, ``guidance_anatomy``, ``guidance_style``).
        batch_images: images in the sampler batch this chunk shared.
        sample_s: seconds the batch took.
    """

    images: np.ndarray
    masks: np.ndarray | None
    seeds: list[int]
    settings: dict[str, Any]
    batch_images: int
    sample_s: float

    def pngs(self, version_id: str, conditions: dict[str, Any]) -> list[tuple[int, bytes, bytes | None]]:
        """``(seed, image PNG, pseudo-mask PNG or None)`` of each image, both PNGs carrying the provenance
        every PNG of the platform carries (model version, seed, ``conditions``, sampler settings, kind)."""
        out = []
        for k, seed in enumerate(self.seeds):
            fields = provenance_fields(model_version=version_id, seed=seed, **conditions, **self.settings)
            image = png_bytes(self.images[k], {**fields, "kind": "image"})
            mask = None if self.masks is None else png_bytes(self.masks[k], {**fields, "kind": "pseudo-mask"})
            out.append((seed, image, mask))
        return out


_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]


@serve.deployment(name="ModelServer")
class ModelServer:
    """Samples sample requests for the model versions the ingress names (see the module docstring)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        from vgmedgen.platform.serving.config import ServeConfig

        self.cfg = ServeConfig.model_validate(settings)
        batching = self.cfg.batching

        async def batch(chunks: list[Chunk]) -> list[ChunkResult]:
            return await self._batch(chunks)

        # Wrapped here, not with a decorator on the class, so that every batching setting comes from the
        # config; a batch counts images (the chunks' n), not calls.
        self.batch = serve.batch(
            max_batch_size=batching.max_batch_size,
            batch_wait_timeout_s=batching.batch_wait_timeout_s,
            max_concurrent_batches=batching.max_concurrent_batches,
            batch_size_fn=lambda chunks: sum(c.request.n for c in chunks),
        )(batch)
        self._paths: dict[str, str] = {}
        want_cuda = self.cfg.device == "cuda" or (self.cfg.device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if want_cuda else "cpu")
        torch.set_num_threads(max(1, int(self.cfg.num_cpus)))
        self.loaded = 0
        self.m_images = Counter("vgmedgen_images_generated", "Images sampled.", tag_keys=("model",))
        self.m_batch = Histogram(
            "vgmedgen_batch_images", "Images per sampler batch.", boundaries=[1, 2, 4, 8, 16, 32, 64, 128]
        )
        self.m_loads = Counter("vgmedgen_model_loads", "Model versions loaded.", tag_keys=("model",))
        self.m_load_s = Histogram(
            "vgmedgen_model_load_seconds", "Time to load a model version.", boundaries=_BUCKETS
        )
        self.m_sample_s = Histogram(
            "vgmedgen_batch_seconds", "Time to sample one batch.", boundaries=_BUCKETS
        )

        async def load(model_id: str) -> Any:
            return await self._load(model_id)

        # Wrapped here, not with a decorator on the class, so that the LRU size comes from the config.
        self.get_model = serve.multiplexed(max_num_models_per_replica=self.cfg.max_models_per_replica)(load)

    async def _load(self, model_id: str) -> Any:
        path = self._paths.get(model_id)
        if path is None:  # only the ingress calls this deployment, and it always sends the path
            raise LookupError(f"model version {model_id} was never announced to this replica")
        start = time.perf_counter()
        model = await asyncio.to_thread(load_model, path, self.device)
        model.eval()
        self.m_load_s.observe(time.perf_counter() - start)
        self.m_loads.inc(tags={"model": model_id[:12]})
        self.loaded += 1
        return model

    async def _batch(self, chunks: list[Chunk]) -> list[ChunkResult]:
        by_model: dict[str, list[int]] = {}
        for i, c in enumerate(chunks):
            by_model.setdefault(c.model_id, []).append(i)
        results: list[ChunkResult | None] = [None] * len(chunks)
        for model_id, members in by_model.items():
            model = await self.get_model(model_id)
            for i, result in zip(
                members, await asyncio.to_thread(self._sample, model, [chunks[i] for i in members])
            ):
                results[i] = result
            self.m_images.inc(sum(chunks[i].request.n for i in members), tags={"model": model_id[:12]})
        return [r for r in results if r is not None]

    def _sample(self, model: Any, chunks: list[Chunk]) -> list[ChunkResult]:
        start = time.perf_counter()
        requests, references = [], {}
        for k, c in enumerate(chunks):
            request = c.request
            if c.reference_pixels is not None:  # a key of the server's own making, never a path
                key = f"upload:{k}"
                references[key] = PIL.Image.fromarray(c.reference_pixels)
                request = request.model_copy(update={"reference": key})
            requests.append(request)
        total = sum(r.n for r in requests)
        samples = generate_samples(
            model, requests, references=references, batch_size=max(total, 1), use_ema=self.cfg.use_ema
        )
        elapsed = time.perf_counter() - start
        self.m_batch.observe(total)
        self.m_sample_s.observe(elapsed)
        rgb = samples.images_uint8()
        masks = samples.masks_uint8()
        out, first = [], 0
        for c, r in zip(chunks, requests):
            span = slice(first, first + r.n)
            first += r.n
            out.append(
                ChunkResult(
                    images=rgb[span],
                    masks=masks[span] if c.return_masks else None,
                    seeds=samples.seeds[span],
                    settings=samples.settings(span.start),
                    batch_images=total,
                    sample_s=elapsed,
                )
            )
        return out

    async def ready(self, model_path: str) -> bool:
        """Load the version this call is routed for (its id is the multiplexed model id): the warm-up."""
        model_id = serve.get_multiplexed_model_id()
        self._paths[model_id] = model_path
        await self.get_model(model_id)
        return True

    async def __call__(self, chunk: Chunk) -> ChunkResult:
        self._paths[chunk.model_id] = chunk.model_path
        return await self.batch(chunk)

    def check_health(self) -> None:
        """Serve's health check: a replica whose torch cannot run fails it and is replaced."""
        torch.zeros(1).add_(1)
