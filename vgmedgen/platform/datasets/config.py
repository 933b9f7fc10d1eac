"""Options of the dataset readers: the ``data.reader`` section of the experiment config."""

from __future__ import annotations

from pathlib import Path

from vgmedgen.model.configbase import StrictConfig

__all__ = ["ReaderOptions"]


class ReaderOptions(StrictConfig):
    """Options of the dataset readers (all optional; defaults fit the public releases).

    Attributes:
        captions_csv: a ``file_name,text`` CSV (as VLM captioners write it; ``caption`` is
            accepted for ``text``) joined onto items by image file name (by relative path
            when ``file_name`` holds one). Unmatched rows and items left without a caption
            are reported as a :class:`DatasetWarning` with counts. Relative paths are taken
            from the dataset root when the file exists there, else from the working directory.
        csv_file: for the ``csv`` reader, the user's dataset table (relative to the root
            like ``captions_csv``). May be omitted when the root itself is the CSV file.
        metadata_file: for ``ham10000``, the metadata table to use instead of searching
            the root for ``HAM10000_metadata*`` / ``*.tab`` / ``*.tsv``.
        skip_missing_files: False (default): a listed image (HAM10000 metadata row, CSV row,
            Kvasir split-list id) or a required mask (Kvasir) that does not exist is a
            :class:`DatasetError` listing the first few and the count; a partial download
            is almost always a mistake. True: such items are skipped with a warning.
    """

    captions_csv: Path | None = None
    csv_file: Path | None = None
    metadata_file: Path | None = None
    skip_missing_files: bool = False
