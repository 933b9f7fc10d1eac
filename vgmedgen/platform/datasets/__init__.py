"""Readers of the real datasets' public layouts (and a user's CSV), and per-item processing.

``read_source_items(name, root, options)`` lists a dataset's images as :class:`SourceItem`
rows; ``process_item(item, resolution, resize)`` turns one into a canonical record dict
(docs/datasets.md). The prepare job runs both, then groups, splits and writes Parquet.
"""

from vgmedgen.platform.datasets.common import (
    READERS,
    CorruptInputError,
    DatasetError,
    DatasetWarning,
    ReaderOptions,
    SourceItem,
    read_source_items,
)
from vgmedgen.platform.datasets.process import (
    RESIZE_POLICIES,
    group_near_duplicates,
    perceptual_hash,
    phash_distance,
    process_item,
)

__all__ = [
    "READERS",
    "RESIZE_POLICIES",
    "CorruptInputError",
    "DatasetError",
    "DatasetWarning",
    "ReaderOptions",
    "SourceItem",
    "group_near_duplicates",
    "perceptual_hash",
    "phash_distance",
    "process_item",
    "read_source_items",
]
