"""Every relative link in the project's Markdown files reaches a file that exists, and every
#anchor a heading of the page it names: the reference lives in docs/ and the pages link to one
another, so a renamed heading or a moved page must not leave a link dangling."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)


def ignored_dirs() -> list[Path]:
    """Directories .gitignore names (`bench/results/`, `tests/screenshots/`): what runs make, and
    what a link may name though a fresh checkout does not have it yet."""
    lines = (ROOT / ".gitignore").read_text().splitlines()
    return [ROOT / line.strip("/") for line in lines if line.endswith("/") and "*" not in line]


def markdown_files() -> list[Path]:
    skip = ignored_dirs()
    return sorted(
        path
        for path in ROOT.rglob("*.md")
        if not any(part.startswith(".") for part in path.relative_to(ROOT).parts)
        and not any(path.is_relative_to(directory) for directory in skip)
    )


def prose(text: str) -> str:
    """The text without code blocks and code spans, where `[x](y)` is not a link."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def anchors(path: Path) -> set[str]:
    """GitHub's ids for the headings of a page: lower case, punctuation dropped, spaces as
    hyphens, and -1, -2... after a repeated one."""
    seen: dict[str, int] = {}
    ids = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        ids.add(slug if count == 0 else f"{slug}-{count}")
    return ids


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in LINK.findall(prose(path.read_text())):
        if SCHEME.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            if not any(resolved.is_relative_to(directory) for directory in ignored_dirs()):
                broken.append(f"{target}: no such file")
            continue
        if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.relative_to(ROOT)}")
    return broken


def test_markdown_files_are_found():
    names = {str(path.relative_to(ROOT)) for path in markdown_files()}
    assert {"README.md", "BENCHMARKS.md", "docs/api.md", "docs/scaling.md"} <= names


def test_every_relative_link_and_anchor_resolves():
    broken = {
        str(path.relative_to(ROOT)): links
        for path in markdown_files()
        if (links := broken_links(path))
    }
    assert not broken, broken


def test_the_readme_links_every_docs_page():
    readme = prose((ROOT / "README.md").read_text())
    linked = {target.partition("#")[0] for target in LINK.findall(readme)}
    pages = {str(path.relative_to(ROOT)) for path in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, sorted(pages - linked)


def test_the_anchor_check_catches_a_broken_anchor(tmp_path, monkeypatch):
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## Fan-out modes\n\n[ok](#fan-out-modes) [bad](#fanout-modes)\n")
    (tmp_path / ".gitignore").write_text("")
    assert broken_links(page) == ["#fanout-modes: no heading #fanout-modes in page.md"]
