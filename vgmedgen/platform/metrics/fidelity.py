"""FID/KID through torch-fidelity's Inception, and domain FD/KD (HFD, KFD, ...) through our networks.

One code path produces our numbers: uint8 images -> a torch-fidelity feature extractor (its
``inception-v3-compat``, or :class:`DomainFeatureExtractor` wrapping a ``domain_nets`` network) ->
:class:`~vgmedgen.platform.metrics.stats.FeatureSummary` per shard -> merge ->
:func:`~vgmedgen.platform.metrics.stats.frechet_distance` and
:func:`~vgmedgen.platform.metrics.stats.kernel_distance`. :func:`torch_fidelity_metrics` runs
torch-fidelity's own ``calculate_metrics`` on the same images and weights; the tests prove the two
agree.

Inception weights are never downloaded here: they are read from ``feature_extractor_weights_path``
(the file torch-fidelity would fetch from ``URL_INCEPTION_V3``). Without it, FID is skipped with a
warning, or fails with a :class:`MetricsError` that says how to supply the file when FID is required.

Shape legend: N images, H/W size, D feature width.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from tqdm.auto import tqdm

from vgmedgen.model.domain_nets import DomainNet, load_domain_net
from vgmedgen.platform.evaluation.config import INCEPTION_WEIGHTS_FILE, FidelityConfig
from vgmedgen.platform.metrics.stats import (
    FeatureStats,
    FeatureSummary,
    KernelDistance,
    MetricsError,
    SmallSampleWarning,
    frechet_distance,
    kernel_distance,
)

__all__ = [
    "DOMAIN_EXTRACTOR_NAME",
    "DOMAIN_KD_METRIC_NAMES",
    "DOMAIN_METRIC_NAMES",
    "INCEPTION_EXTRACTOR_NAME",
    "INCEPTION_FEATURE_LAYER",
    "WEIGHTS_FIELD",
    "Distances",
    "DomainFeatureExtractor",
    "FidelityConfig",
    "check_inception_weights",
    "compute_distances",
    "create_domain_extractor",
    "create_inception_extractor",
    "distance_floor",
    "domain_metric_names",
    "extract_features",
    "inception_available",
    "kaiming_inception_state_dict",
    "register_domain_extractor",
    "resolve_device",
    "summarise_images",
    "torch_fidelity_metrics",
]

INCEPTION_EXTRACTOR_NAME = "inception-v3-compat"
INCEPTION_FEATURE_LAYER = "2048"  # torch-fidelity's default layer for FID and KID
DOMAIN_EXTRACTOR_NAME = "vgmedgen-domain"
DOMAIN_FEATURE_LAYER = "features"

# Where the weights path sits in an experiment config; the error message names it.
WEIGHTS_FIELD = "evaluate.fidelity.feature_extractor_weights_path"

# Per-dataset names of the domain distances (the paper's HFD for HAM10000, Med-Art's KFD for Kvasir).
DOMAIN_METRIC_NAMES: dict[str, str] = {
    "ham10000": "HFD",
    "kvasir_seg": "KFD",
    "busi": "BFD",
    "synthderm": "SFD",
}
DOMAIN_KD_METRIC_NAMES: dict[str, str] = {
    "ham10000": "HKD",
    "kvasir_seg": "KKD",
    "busi": "BKD",
    "synthderm": "SKD",
}


def domain_metric_names(dataset: str) -> tuple[str, str]:
    """(FD name, KD name) of a dataset's domain distances; other datasets get the generic DFD/DKD."""
    return DOMAIN_METRIC_NAMES.get(dataset, "DFD"), DOMAIN_KD_METRIC_NAMES.get(dataset, "DKD")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None -> cuda when available, else cpu."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MetricsError(
            "device 'cuda' was requested for feature extraction but CUDA is not available here"
        )
    return dev


# --------------------------------------------------------------------------------------------------
# Inception weights: availability and the error that says how to get them
# --------------------------------------------------------------------------------------------------


def inception_available(cfg: FidelityConfig) -> bool:
    """Whether ``cfg.feature_extractor_weights_path`` names an existing file."""
    return cfg.inception_weights_present()


def _missing_weights_message(cfg: FidelityConfig, field_path: str, optional: bool = False) -> str:
    path = cfg.feature_extractor_weights_path
    problem = "is not set" if path is None else f"points to {path}, which does not exist"
    fid_field = field_path.rsplit(".", 1)[0] + ".fid" if "." in field_path else "fid"
    return (
        f"FID/KID need torch-fidelity's Inception-v3 weights ('{INCEPTION_EXTRACTOR_NAME}'), but `{field_path}` "
        f"{problem}. torch-fidelity downloads them from {URL_INCEPTION_V3} (its URL_INCEPTION_V3); this platform "
        f"never downloads at run time. Fetch that file ({INCEPTION_WEIGHTS_FILE}) on a machine with internet "
        f"access, copy it here and pass `{field_path}=/abs/path/{INCEPTION_WEIGHTS_FILE}`"
        + (
            ". Until then the domain distances stand alone."
            if optional
            else f"; or set `{fid_field}=auto` to skip FID/KID with a warning and rely on the domain distances."
        )
    )


def check_inception_weights(
    cfg: FidelityConfig, *, required: bool | None = None, field_path: str = WEIGHTS_FIELD
) -> str | None:
    """Decide whether FID/KID can run; raise when they must, return a warning text when they are optional.

    Args:
        cfg: the fidelity config.
        required: overrides ``cfg.fid == "required"`` when given.
        field_path: the dotted config path of the weights field, quoted in messages.

    Returns:
        None when the weights file exists (or FID is off); otherwise, when FID is optional, the warning
        to log (FID/KID are then skipped).

    Raises:
        MetricsError: FID is required and the weights file is missing; the message names the config
            field and where to get the file.
    """
    must = cfg.fid == "required" if required is None else required
    if cfg.fid == "off" and not must:
        return None
    if inception_available(cfg):
        return None
    if must:
        raise MetricsError(_missing_weights_message(cfg, field_path))
    return "FID/KID skipped. " + _missing_weights_message(cfg, field_path, optional=True)


def create_inception_extractor(
    weights_path: str | Path, device: str | torch.device | None = None, field_path: str = WEIGHTS_FIELD
) -> FeatureExtractorBase:
    """torch-fidelity's ``inception-v3-compat`` extractor with weights from a local file (features "2048").

    The file is first opened with ``torch.load(weights_only=True)``: torch-fidelity itself loads it
    with ``weights_only=False``, which would run any code pickled into it; a file that is not a plain
    state dict is refused before that.
    """
    from torch_fidelity.utils import create_feature_extractor

    path = Path(weights_path).expanduser()
    if not path.is_file():
        cfg = FidelityConfig(feature_extractor_weights_path=path)
        raise MetricsError(_missing_weights_message(cfg, field_path))
    weights_file = str(path)
    try:
        state = torch.load(weights_file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a plain weights file"
        raise MetricsError(
            f"{path} is not a plain PyTorch state dict of tensors ({type(err).__name__}: {str(err)[:200]}); "
            f"`{field_path}` must point to torch-fidelity's {INCEPTION_WEIGHTS_FILE}"
        ) from None
    del state
    try:
        extractor = create_feature_extractor(
            INCEPTION_EXTRACTOR_NAME,
            [INCEPTION_FEATURE_LAYER],
            cuda=False,
            feature_extractor_weights_path=str(path),
            verbose=False,
        )
    except RuntimeError as err:  # load_state_dict: missing/unexpected keys or shapes
        raise MetricsError(
            f"{path} does not hold torch-fidelity's Inception-v3 weights ({str(err)[:300]}); "
            f"`{field_path}` must point to {INCEPTION_WEIGHTS_FILE}"
        ) from None
    return extractor.to(resolve_device(device))


def kaiming_inception_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict for torch-fidelity's Inception with Kaiming-normal convolutions: for tests and timing only.

    Features from these weights mean nothing, but unlike PyTorch's default init (whose features are
    nearly constant: FID ~1e-16 between any two sets) they vary between images, so parity and
    throughput can be checked without the real file.
    """
    import tempfile

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _ArchitectureOnly(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
            return None  # keep the freshly built modules; the real loader would demand every key

    # The constructor always reads a weights file; give it an empty one instead of the download.
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        net = _ArchitectureOnly(
            INCEPTION_EXTRACTOR_NAME, [INCEPTION_FEATURE_LAYER], feature_extractor_weights_path=str(empty)
        )
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=gen)
            elif isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=0.01, generator=gen)
                torch.nn.init.zeros_(module.bias)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


# --------------------------------------------------------------------------------------------------
# Domain extractor registered with torch-fidelity
# --------------------------------------------------------------------------------------------------


class DomainFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor wrapping a ``domain_nets`` network (feature "features", (N, D)).

    Takes uint8 (N, C, H, W) images of any size, like torch-fidelity's Inception, and returns the
    network's pooled features as float32. Built either from a network object (our path) or, inside
    torch-fidelity's ``calculate_metrics(feature_extractor="vgmedgen-domain", ...)``, from the
    safetensors file written by ``domain_nets.save_domain_net`` passed as
    ``feature_extractor_weights_path``.
    """

    def __init__(
        self,
        name: str,
        features_list: Sequence[str],
        feature_extractor_weights_path: str | None = None,
        network: DomainNet | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, list(features_list))
        if network is None:
            if feature_extractor_weights_path is None:
                raise MetricsError(
                    f"the '{DOMAIN_EXTRACTOR_NAME}' extractor needs a network or feature_extractor_weights_path "
                    "(a safetensors file written by vgmedgen.model.domain_nets.save_domain_net)"
                )
            network = load_domain_net(feature_extractor_weights_path)
        self.network = network
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return (DOMAIN_FEATURE_LAYER,)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        if metric not in ("fid", "kid", "prc"):
            raise MetricsError(f"the domain extractor provides features for fid, kid and prc, not '{metric}'")
        return DOMAIN_FEATURE_LAYER

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not (isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.dim() == 4):
            raise MetricsError(
                f"the domain extractor expects uint8 (N, C, H, W) images, got {getattr(x, 'dtype', type(x))}"
            )
        features = self.network.features(self.network.prepare(x)).to(torch.float32)  # (N, D)
        return (features,)


def register_domain_extractor() -> None:
    """Register :class:`DomainFeatureExtractor` with torch-fidelity under ``"vgmedgen-domain"`` (idempotent)."""
    if DOMAIN_EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(DOMAIN_EXTRACTOR_NAME, DomainFeatureExtractor)


def create_domain_extractor(
    network: DomainNet, device: str | torch.device | None = None
) -> DomainFeatureExtractor:
    """Our path's domain extractor around an in-memory network (switched to eval mode, no grads)."""
    register_domain_extractor()
    extractor = DomainFeatureExtractor(DOMAIN_EXTRACTOR_NAME, [DOMAIN_FEATURE_LAYER], network=network)
    return extractor.to(resolve_device(device))


# --------------------------------------------------------------------------------------------------
# Images -> features -> summaries -> distances
# --------------------------------------------------------------------------------------------------

Images = torch.Tensor | np.ndarray | Iterable[torch.Tensor | np.ndarray]


def _as_uint8_nchw(batch: torch.Tensor | np.ndarray) -> torch.Tensor:
    tensor = torch.as_tensor(batch)
    if tensor.dtype != torch.uint8:
        raise MetricsError(
            f"feature extraction expects uint8 images in 0..255, got dtype {tensor.dtype}; "
            "convert with (x.clamp(0, 1) * 255).round().to(torch.uint8)"
        )
    if tensor.ndim != 4 or tensor.shape[1] not in (1, 3):
        raise MetricsError(f"feature extraction expects (N, 3, H, W) images, got shape {tuple(tensor.shape)}")
    if tensor.shape[1] == 1:  # greyscale (e.g. ultrasound) -> RGB, as the extractors expect 3 channels
        tensor = tensor.expand(-1, 3, -1, -1)
    return tensor


def _batches(images: Images, batch_size: int) -> Iterator[torch.Tensor]:
    """Yield uint8 (n, 3, H, W) batches of at most ``batch_size`` from a tensor/array or an iterable of them."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        images = [images]
    for block in images:
        block = _as_uint8_nchw(block)
        for start in range(0, block.shape[0], batch_size):
            yield block[start : start + batch_size]


def _features_of(extractor: FeatureExtractorBase, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    with torch.no_grad():
        out = extractor(batch.to(device, non_blocking=True))
    return out[0].detach().to("cpu", torch.float32)  # (n, D)


def _count(images: Images) -> int | None:
    """How many images, when known up front (a tensor/array, or a sequence of them); None for a stream."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        return int(images.shape[0])
    if isinstance(images, Sequence):
        return sum(int(block.shape[0]) for block in images)
    return None


def _progress_batches(images: Images, batch_size: int, desc: str, progress: bool) -> Iterator[torch.Tensor]:
    """:func:`_batches` with a progress bar counting images (on stderr: the terminal, and the job log
    under ``ray job submit``). Inception on a CPU takes seconds per batch, minutes per set."""
    with tqdm(total=_count(images), desc=desc, unit="image", disable=not progress) as bar:
        for batch in _batches(images, batch_size):
            yield batch
            bar.update(batch.shape[0])


def extract_features(
    extractor: FeatureExtractorBase,
    images: Images,
    *,
    batch_size: int = 64,
    desc: str = "features",
    progress: bool = True,
) -> torch.Tensor:
    """All features (N, D) float32 on CPU, extracted in batches on the extractor's device (for KD, memorisation).

    Args:
        desc: the progress bar's label (e.g. which extractor and which set).
        progress: show the progress bar; turn it off inside Ray tasks and actors, where a bar's
            carriage returns are noise in the logs.
    """
    dev = next(extractor.parameters()).device
    feats = [
        _features_of(extractor, batch, dev) for batch in _progress_batches(images, batch_size, desc, progress)
    ]
    if not feats:
        raise MetricsError("no images were given to extract features from")
    return torch.cat(feats)


def summarise_images(
    extractor: FeatureExtractorBase,
    images: Images,
    row_ids: Sequence[Any] | None = None,
    *,
    batch_size: int = 64,
    reservoir_size: int = 10_000,
    seed: int = 2020,
    desc: str = "features",
    progress: bool = True,
) -> FeatureSummary:
    """Extract features batch by batch into a :class:`FeatureSummary` (exact moments + seeded sample).

    Features are folded into the statistics batch by batch, so memory is bounded by one batch plus
    the reservoir (``reservoir_size`` rows), however large the set. Images go to the extractor's
    device. Shards of one set must use globally unique ``row_ids`` (record ids); None numbers rows
    0..N-1, fine for a set that is not split into shards. ``desc`` and ``progress`` as in
    :func:`extract_features`.
    """
    dev = next(extractor.parameters()).device
    summary: FeatureSummary | None = None
    offset = 0
    for batch in _progress_batches(images, batch_size, desc, progress):
        feats = _features_of(extractor, batch, dev)  # (n, D)
        if summary is None:
            summary = FeatureSummary.empty(feats.shape[1], reservoir_size, seed)
        n = feats.shape[0]
        if row_ids is None:
            ids: Sequence[Any] = range(offset, offset + n)
        else:
            ids = row_ids[offset : offset + n]
            if len(ids) != n:
                raise MetricsError(
                    f"got fewer row ids ({len(row_ids)}) than images (more than {offset + len(ids)})"
                )
        summary.update(feats, list(ids))
        offset += n
    if summary is None:
        raise MetricsError("no images were given to summarise")
    if row_ids is not None and len(row_ids) != offset:
        raise MetricsError(f"got {len(row_ids)} row ids for {offset} images")
    return summary


@dataclass
class Distances:
    """FD and KD between two sets, with the sizes they were computed at and any small-sample warnings."""

    fd: float
    kd_mean: float
    kd_std: float
    n_a: int
    n_b: int
    kd_subset_size: int
    kd_subsets: int
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compute_distances(
    a: FeatureSummary | FeatureStats,
    b: FeatureSummary | FeatureStats,
    *,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 2020,
    features_a: Any = None,
    features_b: Any = None,
) -> Distances:
    """FD from the exact (merged) moments and KD from the kept samples (or from ``features_a/b`` when given).

    Small-sample warnings are both emitted and collected in :attr:`Distances.warnings`, so reports can
    show them beside the numbers.
    """
    stats_a = a.stats if isinstance(a, FeatureSummary) else a
    stats_b = b.stats if isinstance(b, FeatureSummary) else b
    if features_a is None:
        features_a = a.reservoir.features if isinstance(a, FeatureSummary) else None
    if features_b is None:
        features_b = b.reservoir.features if isinstance(b, FeatureSummary) else None
    if features_a is None or features_b is None:
        raise MetricsError("KD needs feature samples: pass FeatureSummary objects or features_a/features_b")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SmallSampleWarning)
        fd = frechet_distance(stats_a, stats_b)
        kd: KernelDistance = kernel_distance(
            features_a, features_b, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed
        )
    messages = []
    for w in caught:
        if issubclass(w.category, SmallSampleWarning):
            messages.append(str(w.message))
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return Distances(fd, kd.mean, kd.std, stats_a.count, stats_b.count, kd.subset_size, kd.subsets, messages)


def distance_floor(
    train: FeatureSummary,
    test: FeatureSummary,
    n: int,
    *,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 2020,
) -> Distances:
    """The floor of a distance at generated-set size ``n``: real train (n rows) vs real test.

    FD and KD are biased by sample size, so a generated set of n images is judged against real
    training images at the same n. The n rows are the first n of the train reservoir, which (keys
    being uniform hashes) is the seeded bottom-n sample of the whole train split.
    """
    kept = len(train.reservoir)
    if n > kept:
        raise MetricsError(
            f"the floor at N={n} needs {n} train rows, but the train reservoir keeps {kept} "
            f"(seen {train.reservoir.seen}); raise reservoir_size to >= {n}, or evaluate fewer images"
        )
    sample = train.reservoir.features[:n]  # (n, D)
    return compute_distances(
        FeatureStats.from_features(sample),
        test.stats,
        kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size,
        seed=seed,
        features_a=sample,
        features_b=test.reservoir.features,
    )


# --------------------------------------------------------------------------------------------------
# torch-fidelity's own computation, for parity checks
# --------------------------------------------------------------------------------------------------


class _UInt8Images(torch.utils.data.Dataset):
    """A Dataset of uint8 (3, H, W) tensors, the input torch-fidelity's ``calculate_metrics`` takes."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = _as_uint8_nchw(images).contiguous()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def torch_fidelity_metrics(
    images_a: torch.Tensor,
    images_b: torch.Tensor,
    *,
    feature_extractor: str = INCEPTION_EXTRACTOR_NAME,
    weights_path: str | Path,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 2020,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """FID and KID from torch-fidelity's own ``calculate_metrics`` (no cache, no download, no workers).

    Used to prove that our sharded path gives torch-fidelity's numbers. ``feature_extractor`` is
    ``"inception-v3-compat"`` (weights_path: the Inception weights) or ``"vgmedgen-domain"``
    (weights_path: a file from ``save_domain_net``).
    """
    import torch_fidelity

    if feature_extractor == DOMAIN_EXTRACTOR_NAME:
        register_domain_extractor()
    dev = resolve_device(device)
    return torch_fidelity.calculate_metrics(
        input1=_UInt8Images(images_a),
        input2=_UInt8Images(images_b),
        fid=True,
        kid=True,
        feature_extractor=feature_extractor,
        feature_extractor_weights_path=str(weights_path),
        kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size,
        rng_seed=seed,
        batch_size=batch_size,
        cuda=dev.type == "cuda",
        cache=False,
        save_cpu_ram=True,  # no DataLoader worker processes
        verbose=False,
    )
