"""The repository stands on its own: no file points at a path of one particular machine or at notes
outside the repository, and every relative link of the README and docs/ resolves (file and heading).

Files are those git lists (tracked, plus untracked files git does not ignore, so a new file is checked
before its first commit). The patterns are written so that this file's own source does not match them;
it is scanned like every other file.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# What may not appear in any file, and why. Each pattern is spelled with a character class or escapes so
# that this source text does not contain the string it forbids.
FORBIDDEN: dict[str, re.Pattern[str]] = {
    "a link to a folder beside the repository (write docs/ pages instead)": re.compile(r"\.\./share[d]"),
    "the team notes outside the repository (cite docs/method.md, datasets.md, design.md)": re.compile(
        r"\bshare[d]/[A-Z][A-Z_]*\.md"
    ),
    "a path of the development machine": re.compile(r"/wor[k]/"),
    "a home directory of one machine (use ~ or a placeholder such as /path/to)": re.compile(
        r"/roo[t]/|/hom[e]/|/User[s]/"
    ),
    # Ray's own session directory is the same on every machine; anything else under it is one machine's.
    "a temporary path of one machine (tests use pytest's tmp_path)": re.compile(r"/tm[p]/(?!ray/)"),
}

# Inline Markdown links and images: [text](target) or [text](target "title").
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def repository_files() -> list[Path]:
    """Every file git tracks, plus the untracked ones it does not ignore, that exists on disk."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the file list comes from `git ls-files`")
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    names = sorted({n for n in out.decode().split("\0") if n})
    return [REPO / n for n in names if (REPO / n).is_file()]


def read_text(path: Path) -> str | None:
    """The file's text, or None for a binary file (one holding a NUL byte)."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    return data.decode("utf-8", errors="replace")


def forbidden_mentions(path: Path, text: str) -> list[str]:
    """``file:line: what`` for every forbidden mention in ``text``."""
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for why, pattern in FORBIDDEN.items():
            for match in pattern.finditer(line):
                found.append(f"{path.relative_to(REPO)}:{lineno}: {match.group(0)!r} is {why}")
    return found


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = CODE_SPAN.sub(lambda m: m.group(0).strip("`"), heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every heading anchor of a Markdown text (repeated headings get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", markdown)):
        slug = github_slug(heading)
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def broken_links(md: Path, repo: Path = REPO) -> list[str]:
    """Relative links of ``md`` whose file (inside ``repo``) or heading does not exist."""
    text = md.read_text(encoding="utf-8")
    prose = CODE_SPAN.sub("", FENCE.sub("", text))
    broken = []
    for target in LINK.findall(prose):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto: ...
            continue
        file_part, _, fragment = target.partition("#")
        dest = (md.parent / file_part).resolve() if file_part else md.resolve()
        where = f"{md.relative_to(repo)}: ({target})"
        if not dest.is_relative_to(repo.resolve()):
            broken.append(f"{where} leaves the repository")
        elif not dest.exists():
            broken.append(f"{where} names a file that does not exist")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest.read_text(encoding="utf-8")):
            broken.append(f"{where} names a heading {dest.name} does not have")
    return broken


def documentation_pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_no_file_points_at_one_machine_or_outside_the_repository():
    files = repository_files()
    scanned = {p.relative_to(REPO).as_posix() for p in files if read_text(p) is not None}
    # The scan must see the files it is about, this one included.
    assert {"README.md", "Makefile", "tests/test_repository.py", "docs/method.md"} <= scanned
    assert any(name.startswith("configs/") for name in scanned)
    found = [hit for p in files if (text := read_text(p)) is not None for hit in forbidden_mentions(p, text)]
    assert found == [], "\n".join(found)


# Documents cited by name in prose, docstrings and comments: an upper-case note (the way team notes are named)
# or a page of docs/. Each must be a file of the repository.
CITED_NOTE = re.compile(r"(?<![\w/.-])([A-Z][A-Z_]*\.md)\b")
CITED_PAGE = re.compile(r"(?<![\w/.-])(docs/[\w.-]+\.md)\b")
# Upper-case names of files the project writes into its outputs (a model version's card), not notes.
WRITTEN = {"MODEL_CARD.md"}


def missing_citations(path: Path, text: str, names: set[str]) -> list[str]:
    """``file:line: name`` for every cited document that is not among the repository's file ``names``."""
    basenames = {n.rsplit("/", 1)[-1] for n in names} | WRITTEN
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        found += [
            f"{path.relative_to(REPO)}:{lineno}: {m}" for m in CITED_NOTE.findall(line) if m not in basenames
        ]
        found += [
            f"{path.relative_to(REPO)}:{lineno}: {m}" for m in CITED_PAGE.findall(line) if m not in names
        ]
    return found


def test_every_cited_document_exists():
    files = repository_files()
    names = {p.relative_to(REPO).as_posix() for p in files}
    found = [
        hit for p in files if (text := read_text(p)) is not None for hit in missing_citations(p, text, names)
    ]
    assert found == [], "cited but not in the repository:\n" + "\n".join(found)


def test_the_documentation_pages_exist():
    names = {p.name for p in documentation_pages()}
    assert {"README.md", "method.md", "datasets.md", "design.md", "experiments.md"} <= names


@pytest.mark.parametrize("page", documentation_pages(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_resolves(page: Path):
    assert page.is_file()
    assert broken_links(page) == []


def test_the_checks_catch_what_they_are_for(tmp_path: Path):
    """A forbidden mention and broken links are found (so the checks above can fail)."""
    machine = "/wo" + "rk/main/.venv"
    hits = forbidden_mentions(REPO / "x.md", f"see {machine} and ../" + "shared/notes\nok: /tmp/ray/session")
    assert len(hits) == 2 and "x.md:1:" in hits[0]
    note, page = "METHOD" + ".md", "docs" + "/nowhere.md"  # split, so this file cites neither
    cited = f"as in {note} and {page}, not README.md or docs/method.md"
    hits = missing_citations(REPO / "x.py", cited, {"README.md", "docs/method.md"})
    assert hits == [f"x.py:1: {note}", f"x.py:1: {page}"]

    (tmp_path / "pages").mkdir()
    (tmp_path / "pages" / "a.md").write_text("# Title\n\n## Sub part (b)\n")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](pages/a.md) [ok](pages/a.md#sub-part-b) [ok](#top) [web](https://example.org/x)\n"
        "`[code](missing.md)`\n\n```\n[fenced](missing.md)\n```\n\n# Top\n"
        "[gone](pages/missing.md) [anchor](pages/a.md#nope) [out](../outside.md)\n"
    )
    problems = broken_links(page, tmp_path)
    assert len(problems) == 3, problems
    assert "pages/missing.md" in problems[0] and "#nope" in problems[1] and "leaves" in problems[2]
