"""Every reference to the project's documentation points to a file and an anchor that exist.

Scans the code (``lipnet/``, ``certify/``), ``README.md`` and ``docs/`` as plain text (nothing is
imported, so the check runs even when a module does not):

* a path ``docs/....md`` (optionally ``#anchor``) anywhere in those files must name an existing file,
  and the anchor must exist in it;
* a relative Markdown link ``[text](target.md#anchor)`` or ``[text](#anchor)`` inside ``docs/`` or
  ``README.md`` must resolve the same way (web links are not checked);
* no reference to the research notes ``research-*.md`` may remain: they live outside the repository,
  so a user cannot follow them; the proofs are in ``docs/proofs/``;
* a bare proof anchor ``#lemma-...`` (a docstring naming several anchors of one file after its
  path) must be an anchor of some file of ``docs/proofs/``;
* every test named in ``docs/proofs/`` (a backticked ``test_...`` identifier, with an optional
  ``[parameter id]``) must be a test function defined under ``tests/``.

Anchors are the explicit ``<a id="...">`` / ``<a name="...">`` of a Markdown file and the GitHub slugs
of its headings.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CODE_DIRS = ("lipnet", "certify")
DOCS = ROOT / "docs"

_DOC_PATH = re.compile(r"(?<![\w/.-])(docs/[\w./-]+?\.md)(#[\w-]+)?")
_MD_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_RESEARCH = re.compile(r"research-[\w-]*\.md")
_LEMMA_ANCHOR = re.compile(r"#(lemma-[\w-]+)")
_EXPLICIT_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
_TEST_NAME = re.compile(r"`(test_\w+)(?:\[[^\]`]*\])?`")
_TEST_DEF = re.compile(r"^\s*(?:async\s+)?def\s+(test_\w+)\s*\(", re.MULTILINE)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*|_{2,}", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    found = set(_EXPLICIT_ANCHOR.findall(text))
    in_code = False
    seen: dict[str, int] = {}
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        match = None if in_code else _HEADING.match(line)
        if match:
            slug = _slug(match.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def _scanned_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for name in CODE_DIRS:
        files += sorted((ROOT / name).rglob("*.py"))
    files += sorted(DOCS.rglob("*.md"))
    return [f for f in files if f.is_file()]


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def _check_target(target: Path, anchor: str | None, where: str, problems: list[str]) -> None:
    if not target.is_file():
        shown = target.relative_to(ROOT) if target.is_relative_to(ROOT) else target
        problems.append(f"{where}: {shown} does not exist")
    elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
        problems.append(f"{where}: no anchor #{anchor} in {target.relative_to(ROOT)}")


def _line_of(text: str, index: int) -> int:
    return text.count("\n", 0, index) + 1


def test_doc_paths_in_code_and_docs_exist() -> None:
    problems: list[str] = []
    for path in _scanned_files():
        text = path.read_text(encoding="utf-8")
        for match in _DOC_PATH.finditer(text):
            where = f"{path.relative_to(ROOT)}:{_line_of(text, match.start())}"
            anchor = match.group(2)[1:] if match.group(2) else None
            _check_target(ROOT / match.group(1), anchor, where, problems)
    assert not problems, "broken documentation references:\n" + "\n".join(problems)


def test_relative_markdown_links_resolve() -> None:
    problems: list[str] = []
    for path in _markdown_files():
        text = path.read_text(encoding="utf-8")
        for match in _MD_LINK.finditer(text):
            target = match.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            where = f"{path.relative_to(ROOT)}:{_line_of(text, match.start())}"
            file_part, _, anchor = target.partition("#")
            resolved = path if not file_part else (path.parent / file_part).resolve()
            _check_target(resolved, anchor or None, where, problems)
    assert not problems, "broken Markdown links:\n" + "\n".join(problems)


def test_no_reference_to_the_research_notes_remains() -> None:
    found = []
    for path in _scanned_files():
        text = path.read_text(encoding="utf-8")
        for match in _RESEARCH.finditer(text):
            found.append(f"{path.relative_to(ROOT)}:{_line_of(text, match.start())}: {match.group(0)}")
    assert not found, (
        "references to research notes outside the repository (point to docs/proofs/ instead):\n"
        + "\n".join(found)
    )


def test_bare_proof_anchors_exist() -> None:
    anchors: set[str] = set()
    for path in (DOCS / "proofs").rglob("*.md"):
        anchors |= _anchors(path)
    missing = []
    for path in _scanned_files():
        text = path.read_text(encoding="utf-8")
        for match in _LEMMA_ANCHOR.finditer(text):
            if match.group(1) not in anchors:
                missing.append(f"{path.relative_to(ROOT)}:{_line_of(text, match.start())}: #{match.group(1)}")
    assert not missing, "proof anchors that no file of docs/proofs defines:\n" + "\n".join(missing)


def test_tests_named_in_the_proofs_exist() -> None:
    defined: set[str] = set()
    for path in (ROOT / "tests").rglob("*.py"):
        defined.update(_TEST_DEF.findall(path.read_text(encoding="utf-8")))
    missing = []
    for path in sorted((DOCS / "proofs").rglob("*.md")):
        text = path.read_text(encoding="utf-8")
        for match in _TEST_NAME.finditer(text):
            if match.group(1) not in defined:
                missing.append(f"{path.relative_to(ROOT)}:{_line_of(text, match.start())}: {match.group(1)}")
    assert not missing, "tests named in docs/proofs that no file under tests/ defines:\n" + "\n".join(missing)


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("Lemma 1: the block-gated product", "lemma-1-the-block-gated-product"),
        ("Certificates: from a bound to a radius", "certificates-from-a-bound-to-a-radius"),
        ("Theorem: L2 attention (`L2MultiheadAttention`)", "theorem-l2-attention-l2multiheadattention"),
    ],
)
def test_heading_slugs_follow_github(heading: str, slug: str) -> None:
    assert _slug(heading) == slug
