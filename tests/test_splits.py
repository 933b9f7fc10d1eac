"""Group-safe, stratified, deterministic splits."""

from __future__ import annotations

from collections import Counter

from vgmedgen.platform.splits import assign_splits

FR = {"train": 0.8, "val": 0.1, "test": 0.1}


def _toy(n_groups: int = 300):
    ids, groups, labels = [], [], []
    for g in range(n_groups):
        label = "a" if g % 3 else "b"
        for k in range(1 + (g % 4 == 0)):  # every 4th group has two images
            ids.append(f"img{g:04d}_{k}")
            groups.append(f"g{g:04d}")
            labels.append(label)
    return ids, groups, labels


def test_groups_are_never_cut_and_fractions_hold():
    ids, groups, labels = _toy()
    split = assign_splits(ids, groups, labels, FR, seed=0)
    per_group: dict[str, set[str]] = {}
    for i, g in zip(ids, groups):
        per_group.setdefault(g, set()).add(split[i])
    assert all(len(s) == 1 for s in per_group.values())
    counts = Counter(split.values())
    assert abs(counts["train"] / len(ids) - 0.8) < 0.03
    assert abs(counts["val"] / len(ids) - 0.1) < 0.03
    # stratified: each class is split in about the same proportions
    for label in ("a", "b"):
        c = Counter(split[i] for i, lab in zip(ids, labels) if lab == label)
        assert abs(c["train"] / sum(c.values()) - 0.8) < 0.05


def test_deterministic_and_seed_dependent():
    ids, groups, labels = _toy()
    assert assign_splits(ids, groups, labels, FR, 0) == assign_splits(ids, groups, labels, FR, 0)
    assert assign_splits(ids, groups, labels, FR, 0) != assign_splits(ids, groups, labels, FR, 1)
    # input order does not matter
    order = list(reversed(range(len(ids))))
    rev = assign_splits(
        [ids[i] for i in order], [groups[i] for i in order], [labels[i] for i in order], FR, 0
    )
    assert rev == assign_splits(ids, groups, labels, FR, 0)


def test_official_lists_are_kept_and_val_carved_from_train():
    ids = [f"p{i:03d}" for i in range(100)]
    official = {i: ("test" if n >= 88 else "train") for n, i in enumerate(ids)}
    split = assign_splits(ids, ids, ["polyp"] * 100, FR, 0, official)
    assert all(split[i] == "test" for i in ids[88:])
    c = Counter(split[i] for i in ids[:88])
    assert c["test"] == 0 and 5 <= c["val"] <= 14 and c["train"] + c["val"] == 88
