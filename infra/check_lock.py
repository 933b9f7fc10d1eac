"""Check that the installed distributions the project depends on are exactly the versions of the lock.

    python infra/check_lock.py constraints.txt [distribution ...]

Walks the requirements of ``vgmedgen`` (or of the distributions named), with the extras they ask for, through
every installed dependency, and compares each version with its pin in the lock file. Exits 1 listing every
difference (or a dependency that is not installed or not pinned), 0 when they all match. infra/Dockerfile runs it
after installing, so an image never carries a version the lock does not name; tests/test_infra.py runs it on the
project's virtualenv. Standard library and ``packaging`` only (Ray depends on it), so it runs in a bare image.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# What `pip freeze` leaves out of a lock it writes: the installer's own tools, whatever version the image has.
UNPINNED = frozenset({"pip", "setuptools", "wheel", "distribute"})


def read_lock(path: Path) -> dict[str, str]:
    """``{canonical name: version}`` of a pip constraints file of ``name==version`` lines."""
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise SystemExit(
                f"{path}: {line!r} is not a name==version pin; regenerate the lock with pip freeze"
            )
        pins[canonicalize_name(name)] = version.strip()
    return pins


def dependency_closure(roots: list[str]) -> dict[str, str | None]:
    """``{canonical name: installed version or None}`` of ``roots`` and everything they require, extras included."""
    found: dict[str, str | None] = {}
    todo = [(req.name, frozenset(req.extras)) for req in map(Requirement, roots)]
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        key = (canonicalize_name(name), extras)
        if key in done:
            continue
        done.add(key)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            found[key[0]] = None
            continue
        found[key[0]] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            wanted = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in wanted):
                continue
            todo.append((req.name, frozenset(req.extras)))
    return found


def differences(lock: dict[str, str], roots: list[str]) -> list[str]:
    """One line per installed dependency of ``roots`` (``name`` or ``name[extra,...]``) whose version is not the
    lock's; the roots themselves and :data:`UNPINNED` are not compared."""
    skip = UNPINNED | {canonicalize_name(Requirement(r).name) for r in roots}
    problems = []
    for name, version in sorted(dependency_closure(roots).items()):
        if name in skip:
            continue
        if version is None:
            problems.append(f"{name}: required but not installed")
        elif name not in lock:
            problems.append(f"{name}=={version}: installed but not pinned in the lock")
        elif lock[name] != version:
            problems.append(f"{name}: installed {version}, the lock pins {lock[name]}")
    return problems


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    lock = read_lock(Path(argv[0]))
    roots = argv[1:] or ["vgmedgen"]
    problems = differences(lock, roots)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print(
            f"{len(problems)} installed version(s) differ from {argv[0]}: install with -c {argv[0]}",
            file=sys.stderr,
        )
        return 1
    print(f"every dependency of {', '.join(roots)} matches {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
