"""The documentation holds together: README.md and docs/*.md link only to what exists.

- every relative Markdown link `[text](target)` or `[text](target#anchor)` resolves to a file or
  folder of the repository (relative to the file that links), and an anchor into a `.md` file names
  one of its headings (GitHub's slugs: lowercase, spaces to hyphens, punctuation dropped except
  hyphens and underscores; a repeated heading gets `-1`, `-2`, ...);
- every path in backticks that looks like a repository path (`models/...`, `trainers/...`, ...,
  ending in `.py`, `.md`, `.yaml`, `.sh`, `.json` or `/`) exists, so a renamed file is caught;
- the README stays short (at most 210 lines) and each doc opens with a `# ` title and a paragraph
  saying what it is for.

http(s) links are not followed (no network). Fenced code blocks are skipped: they show commands
and output, not links.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 210

LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_SPAN = re.compile(r"(`+)(?P<code>.+?)\1")
REPO_PATH = re.compile(
    r"^(?:models|trainers|analysis|dashboards|experiments|scripts|docs|tests)/"
    r"[A-Za-z0-9_./-]*(?:\.py|\.md|\.yaml|\.sh|\.json|/)$")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(?P<title>.+?)\s*#*\s*$")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced code blocks."""
    out, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line))
    return out


def slug(title: str) -> str:
    """GitHub's anchor for a heading."""
    text = CODE_SPAN.sub(lambda m: m.group("code"), title)  # `code` in a heading keeps its text
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link keeps its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w keeps letters, digits and underscores
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group("title"))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path: Path) -> list[str]:
    problems = []
    rel = path.relative_to(ROOT)
    for number, line in prose_lines(path):
        line_without_code = CODE_SPAN.sub("", line)
        for m in LINK.finditer(line_without_code):
            target = m.group("target")
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
                continue
            file_part, _, anchor = target.partition("#")
            dest = path if not file_part else (path.parent / file_part).resolve()
            where = f"{rel}:{number}: [{m.group('text')}]({target})"
            if not dest.exists():
                problems.append(f"{where}: {file_part} does not exist")
                continue
            try:
                dest.relative_to(ROOT)
            except ValueError:
                problems.append(f"{where}: points outside the repository")
                continue
            if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    return problems


def missing_paths(path: Path) -> list[str]:
    problems = []
    rel = path.relative_to(ROOT)
    for number, line in prose_lines(path):
        for m in CODE_SPAN.finditer(line):
            code = m.group("code").strip()
            if REPO_PATH.match(code) and not (ROOT / code).exists():
                problems.append(f"{rel}:{number}: `{code}` does not exist")
    return problems


def test_links_and_anchors_resolve():
    problems = [p for f in markdown_files() for p in broken_links(f)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_repository_paths_in_backticks_exist():
    problems = [p for f in markdown_files() for p in missing_paths(f)]
    assert not problems, "paths that do not exist:\n" + "\n".join(problems)


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: keep it to {README_MAX_LINES}, detail in docs/"


def test_each_doc_opens_with_a_title_and_its_purpose():
    problems = []
    for path in markdown_files():
        lines = path.read_text(encoding="utf-8").splitlines()
        rel = path.relative_to(ROOT)
        if not lines or not lines[0].startswith("# "):
            problems.append(f"{rel}:1: expected a '# ' title on the first line")
            continue
        rest = [i for i, line in enumerate(lines[1:], start=2) if line.strip()]
        if not rest:
            problems.append(f"{rel}: nothing after the title")
            continue
        first = lines[rest[0] - 1].lstrip()
        if first.startswith(("#", "|", "```", "~~~", "- ", "* ", ">", "<")) or re.match(r"\d+\. ", first):
            problems.append(f"{rel}:{rest[0]}: expected a paragraph saying what the doc is for after the title")
    assert not problems, "\n".join(problems)


def test_the_checks_catch_what_they_should(tmp_path, monkeypatch):
    """The link, anchor and path checks fail on a broken example (so a pass means something)."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "real.py").write_text("")
    (docs / "a.md").write_text("# A `b` doc: the title\n\nWhat it is for.\n\n## Top-k, causal (routing)\n\n"
                               "## Top-k, causal (routing)\n")
    page = docs / "b.md"
    page.write_text("# B\n\nText.\n\n"
                    "[ok](a.md#a-b-doc-the-title) [ok](a.md#top-k-causal-routing-1) [ok](../models/)\n"
                    "[gone](missing.md) [bad anchor](a.md#nowhere) [web](https://example.com/x)\n"
                    "`models/real.py` `models/renamed.py` `experiments/*.yaml`\n"
                    "```\n[in code](nowhere.md) `models/also_gone.py`\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    links = broken_links(page)
    assert [p.split(": ")[0] for p in links] == ["docs/b.md:6", "docs/b.md:6"], links
    assert "missing.md does not exist" in links[0] and "no heading #nowhere" in links[1]
    assert missing_paths(page) == ["docs/b.md:7: `models/renamed.py` does not exist"]
