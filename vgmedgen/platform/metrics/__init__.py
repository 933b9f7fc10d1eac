"""Evaluation metrics: exact sharded statistics, FID/KID and domain distances, memorisation, reports.

``stats`` (numpy/torch only) holds the mergeable statistics and the distances; ``fidelity`` adds the
torch-fidelity extractors (it imports torch-fidelity and torchvision, so it is imported explicitly:
``from vgmedgen.platform.metrics import fidelity``); ``memorisation`` and ``report`` are light.
"""

from vgmedgen.platform.metrics.memorisation import (
    MemorisationResult,
    count_memorised,
    memorisation_share,
    memorisation_threshold,
    nearest_distances,
)
from vgmedgen.platform.metrics.report import (
    DistanceRow,
    EvaluationReport,
    distance_rows,
    markdown_report,
    write_report,
)
from vgmedgen.platform.metrics.stats import (
    FeatureReservoir,
    FeatureStats,
    FeatureSummary,
    KernelDistance,
    MetricsError,
    SmallSampleWarning,
    frechet_distance,
    kernel_distance,
    relative_difference,
)

__all__ = [
    "DistanceRow",
    "EvaluationReport",
    "FeatureReservoir",
    "FeatureStats",
    "FeatureSummary",
    "KernelDistance",
    "MemorisationResult",
    "MetricsError",
    "SmallSampleWarning",
    "count_memorised",
    "distance_rows",
    "frechet_distance",
    "kernel_distance",
    "markdown_report",
    "memorisation_share",
    "memorisation_threshold",
    "nearest_distances",
    "relative_difference",
    "write_report",
]
