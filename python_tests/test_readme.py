"""Every ```python example in README.md and docs/*.md runs as written (examples that need a GPU, several
processes or a framework's objects are fenced as ```py and only read), and every relative link between
these pages points to a file, and a heading, that exist.

Test ids name the page and the example's first line: ``docs/usage.md:L42``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", flags=re.DOTALL | re.MULTILINE)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _examples() -> list[tuple[Path, int, str]]:
    """(page, line of the code's first line, code) of every ```python block of every page."""
    examples = []
    for page in PAGES:
        text = page.read_text()
        for match in FENCE.finditer(text):
            examples.append((page, text.count("\n", 0, match.start(1)) + 1, match.group(1)))
    return examples


EXAMPLES = _examples()


@pytest.mark.parametrize(("page", "first_line", "source"), EXAMPLES,
                         ids=[f"{_name(page)}:L{line}" for page, line, _ in EXAMPLES])
def test_example_runs(page, first_line, source):
    # Leading newlines put a traceback's line numbers on the page's own lines.
    code = compile("\n" * (first_line - 1) + source, str(page), "exec")
    exec(code, {"__name__": "readme_example"})


def test_readme_has_examples():
    assert sum(page.name == "README.md" for page, _, _ in EXAMPLES) >= 2
    assert len(EXAMPLES) >= 10


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens, a
    repeated anchor numbered from -1."""
    anchors: set[str] = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        title = line.lstrip("#").strip().lower().replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", title).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def _links() -> list:
    links = []
    for page in PAGES:
        for target in dict.fromkeys(LINK.findall(page.read_text())):
            if not re.match(r"[a-z]+:", target):
                links.append(pytest.param(page, target, id=f"{_name(page)}->{target}"))
    return links


@pytest.mark.parametrize(("page", "target"), _links())
def test_relative_link_resolves(page, target):
    path, _, anchor = target.partition("#")
    destination = (page.parent / path).resolve() if path else page
    assert destination.exists(), f"{_name(page)} links to {target}, which does not exist"
    if anchor:
        assert destination.suffix == ".md", f"{_name(page)}: an anchor into {path}"
        where = _name(destination)
        assert anchor in _anchors(destination), f"{_name(page)}: no heading #{anchor} in {where}"
