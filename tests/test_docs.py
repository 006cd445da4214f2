"""Every `docs/design.md §N` citation in the repository names a heading of docs/design.md, and no
file cites the design notes outside the repository."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
SCANNED = ["smft_dist", "configs", "launchers", "slurm", "tests", "docs", "README.md"]
TEXT_SUFFIXES = {".py", ".yaml", ".yml", ".md", ".sh", ".txt", ".json", ".toml", ".cfg"}
# A citation: the page name, then one section number or several ("§1.2, §2.4 and §5").
CITATION = re.compile(r"design\.md\s*((?:§\d+(?:\.\d+)*)(?:\s*(?:,|and|/)\s*§\d+(?:\.\d+)*)*)")
SECTION = re.compile(r"§(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)\.?\s", re.MULTILINE)
# Spelled in pieces so that this file's own examples are not citations.
DOC = "docs/design" + ".md"
FORBIDDEN = ["DESIGN" + " §", "../" + "shared"]


def scanned_files() -> list[Path]:
    files = []
    for name in SCANNED:
        p = ROOT / name
        candidates = [p] if p.is_file() else sorted(p.rglob("*"))
        files += [f for f in candidates if f.is_file() and f.suffix in TEXT_SUFFIXES and "__pycache__" not in f.parts]
    return files


def section_numbers(markdown: str) -> set[str]:
    """-> {"1", "1.1", ...}: the numbers that open the headings of a markdown page."""
    return set(HEADING.findall(markdown))


def citations(text: str) -> list[str]:
    """-> every section number cited as `design.md §N` (with the sections listed after it)."""
    return [num for group in CITATION.findall(text) for num in SECTION.findall(group)]


def unresolved(files: list[Path], sections: set[str], root: Path = ROOT) -> list[str]:
    """-> "path:line: §N" for every citation of a section that is not a heading."""
    bad = []
    for f in files:
        for lineno, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            bad += [f"{f.relative_to(root)}:{lineno}: §{n}" for n in citations(line) if n not in sections]
    return bad


def test_parsers_on_known_text():
    assert section_numbers("# title\n## 1. The method\n### 1.1 Memory layer\n## 2 Shape\ntext 3.1 x\n") == {
        "1", "1.1", "2"}
    assert citations(f"({DOC} §1.2, §2.4 and §5) and paper §4") == ["1.2", "2.4", "5"]
    assert citations(f"see {DOC} §9.9; paper §3") == ["9.9"]


def test_every_design_citation_resolves_to_a_heading():
    sections = section_numbers(DESIGN.read_text(encoding="utf-8"))
    assert {"1", "1.1", "1.2", "1.3", "1.4", "2", "5"} <= sections, sorted(sections)
    files = scanned_files()
    assert len([n for f in files for n in citations(f.read_text(encoding="utf-8", errors="replace"))]) >= 20
    bad = unresolved(files, sections)
    assert not bad, "citations of sections docs/design.md does not have:\n" + "\n".join(bad)


def test_a_missing_section_is_reported(tmp_path):
    f = tmp_path / "x.py"
    f.write_text(f'"""See {DOC} §1.1 and §42."""\n')
    assert unresolved([f], {"1", "1.1"}, root=tmp_path) == ["x.py:1: §42"]


def test_no_file_cites_the_design_notes_outside_the_repository():
    hits = []
    for f in scanned_files():
        for lineno, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            hits += [f"{f.relative_to(ROOT)}:{lineno}: {line.strip()}" for s in FORBIDDEN if s in line]
    assert not hits, "cite docs/design.md instead:\n" + "\n".join(hits)


def test_readme_shows_the_demo_headline_as_the_run_wrote_it():
    """The README's headline tables are the committed runs' headline.md files, unedited."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for path in (ROOT / "docs" / "demo" / "headline.md", ROOT / "docs" / "demo" / "seeds" / "headline.md"):
        table = path.read_text(encoding="utf-8").strip()
        assert table and table in readme, f"README.md does not hold {path.relative_to(ROOT)} verbatim: copy it in"
