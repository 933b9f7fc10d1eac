"""Train/val/test splits that never cut a group, stratified by class, deterministic from a seed.

HAM10000 images of one lesion (``lesion_id``), BUSI near-duplicates and the two views of a
SynthDerm lesion share a group; a group lands in exactly one split. Within each class the groups
are shuffled by a seeded generator and dealt greedily to the split furthest below its target
count, which keeps the fractions close even when groups differ in size.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["assign_splits"]

SPLIT_NAMES = ("train", "val", "test")


def _deal(
    group_sizes: list[tuple[str, int]], fractions: Mapping[str, float], rng: np.random.Generator
) -> dict[str, str]:
    """Deal groups (shuffled) to splits, each to the split with the largest deficit against its target."""
    order = rng.permutation(len(group_sizes))
    total = sum(size for _, size in group_sizes)
    targets = {s: fractions[s] * total for s in SPLIT_NAMES}
    counts = dict.fromkeys(SPLIT_NAMES, 0.0)
    out: dict[str, str] = {}
    for i in order:
        gid, size = group_sizes[i]
        # Ties break in SPLIT_NAMES order, so train fills first.
        split = max(SPLIT_NAMES, key=lambda s: (targets[s] - counts[s], -SPLIT_NAMES.index(s)))
        out[gid] = split
        counts[split] += size
    return out


def assign_splits(
    ids: Sequence[str],
    groups: Sequence[str],
    labels: Sequence[str],
    fractions: Mapping[str, float],
    seed: int,
    official: Mapping[str, str | None] | None = None,
) -> dict[str, str]:
    """Assign every id a split.

    Args:
        ids: record ids.
        groups: the group of each id (ids of one group always share a split).
        labels: the class of each id; a group is stratified by its most common label.
        fractions: ``{"train": f, "val": f, "test": f}`` summing to 1.
        seed: the split is a pure function of (ids, groups, labels, fractions, seed).
        official: optional id -> "train"/"val"/"test" from the dataset's own lists. Ids with an
            official split keep it (a group follows its first member's official split); when the
            official lists have no "val", val is carved out of the official train part.

    Returns:
        id -> split.
    """
    members: dict[str, list[int]] = defaultdict(list)
    for i, gid in enumerate(groups):
        members[gid].append(i)

    group_label = {
        gid: sorted(Counter(labels[i] for i in idx).items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        for gid, idx in members.items()
    }
    group_split: dict[str, str] = {}

    official = official or {}
    official_groups = {gid: official.get(ids[idx[0]]) for gid, idx in members.items()}
    has_official = any(v for v in official_groups.values())
    if has_official:
        has_val = any(v == "val" for v in official_groups.values())
        carve = {}
        for gid, split in official_groups.items():
            if split is None:
                continue
            if split == "train" and not has_val:
                carve[gid] = group_label[gid]
            else:
                group_split[gid] = split
        if carve:
            val_share = fractions["val"] / (fractions["train"] + fractions["val"])
            sub = {"train": 1.0 - val_share, "val": val_share, "test": 0.0}
            group_split.update(_stratified(carve, members, sub, seed))

    rest = {gid: group_label[gid] for gid in members if gid not in group_split}
    if rest:
        group_split.update(_stratified(rest, members, fractions, seed))
    return {ids[i]: group_split[gid] for gid, idx in members.items() for i in idx}


def _stratified(
    group_label: Mapping[str, str],
    members: Mapping[str, list[int]],
    fractions: Mapping[str, float],
    seed: int,
) -> dict[str, str]:
    by_label: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for gid in sorted(group_label):
        by_label[group_label[gid]].append((gid, len(members[gid])))
    out: dict[str, str] = {}
    for k, label in enumerate(sorted(by_label)):
        rng = np.random.default_rng([seed, k, len(by_label[label])])
        out.update(_deal(by_label[label], fractions, rng))
    return out
