"""Documentation references stay inside the repository.

Code comments, docstrings, ``--help`` texts and the Markdown files must point users at the
project's own ``docs/`` pages and named switches, never at files a user who clones or installs
the package does not have (reference notes outside the repository, their section numbers,
private quirk labels or issue numbers). Every ``docs/<page>.md#anchor`` they cite must exist.

Data locations are allowed: tests and scripts may look for the VOC subset beside the checkout.
"""
from __future__ import annotations

import io
import re
import subprocess
import tokenize
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: The project's documentation pages that code and READMEs may cite with an anchor.
DOC_PAGES = ("upstream_clip_es", "vpl", "clip_cpal", "cli")

#: Tracked files not checked: the changelog is a historical record kept by hand, benchmark
#: results are generated output, and this file spells the patterns out.
SKIP_PREFIXES = ("CHANGELOG.md", "benchmarks/results/", "tests/test_docs_refs.py")
TEXT_SUFFIXES = {".py", ".md", ".sh", ".toml", ".cfg", ".ini", ".txt", ".yaml", ".yml", ".rst"}
TEXT_NAMES = {"Makefile"}

#: (name, pattern) of references to material outside the repository.
FORBIDDEN: list[tuple[str, re.Pattern[str]]] = [
    ("path outside the repository", re.compile(r"\.\./shared/(?!data/)|shared/(?:spec|research)\b")),
    ("external spec file", re.compile(r"(?<![\w/\[(])(?:vpl|cpal|clip_es)\.md\b")),
    ("spec file section", re.compile(r"\b(?:vpl|cpal|clip_es)\.md\W{0,3}(?:sections?\b|s\.\d|\d)")),
    ("spec section or check", re.compile(
        r"\b[Ss]pec(?:'s)?\W{0,4}(?:sections?\b|checks?\b|items?\b|defaults?\b|reading\b|value\b|\d)")),
    ("reference to 'the spec'", re.compile(r"\b[Tt]he (?:project )?spec(?:'s)?\b|\(spec\b(?![.,\w])|\bspec\)")),
    ("quirk label", re.compile(r"\b[Qq]uirk Q\d+\b|\bQ(?:[1-9]|1\d|2\d)\b")),
    ("target-mode label", re.compile(r"\bQ-[A-D]\b")),
    ("issue number", re.compile(r"\b[Ii]ssue\s+#?\d+|\bissues?/\d+")),
]
#: Lines naming where the VOC subset lives are data locations, not references.
DATA_LOCATION = re.compile(r"shared/data|\"shared\"\s*/\s*\"data\"|VPL_VOC_ROOT")


def find_forbidden(text: str) -> list[str]:
    """Names of the forbidden patterns found in ``text`` (empty for a clean text)."""
    if DATA_LOCATION.search(text):
        text = DATA_LOCATION.sub("", text)
        text = re.sub(r"\.\./shared/?", "", text)
    return [name for name, pattern in FORBIDDEN if pattern.search(text)]


def _tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (git ls-files failed): the tracked-file scan needs one")
    files = []
    for name in out.decode("utf-8", "replace").split("\0"):
        if not name or name.startswith(SKIP_PREFIXES):
            continue
        path = ROOT / name
        if (path.suffix in TEXT_SUFFIXES or path.name in TEXT_NAMES) and path.is_file():
            data = path.read_bytes()
            if b"\0" not in data:
                files.append(path)
    return files


def _python_prose(source: str) -> Iterator[tuple[int, str]]:
    """``(line, text)`` of every comment and string literal (code itself is not prose)."""
    kinds = {tokenize.COMMENT, tokenize.STRING}
    fstring_middle = getattr(tokenize, "FSTRING_MIDDLE", None)
    if fstring_middle is not None:
        kinds.add(fstring_middle)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in kinds:
            for offset, line in enumerate(tok.string.splitlines()):
                yield tok.start[0] + offset, line


def _prose(path: Path) -> Iterator[tuple[int, str]]:
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".py":
        yield from _python_prose(text)
    else:
        yield from enumerate(text.splitlines(), start=1)


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading's text (before de-duplication)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # link -> its text
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def page_anchors(path: Path) -> set[str]:
    """Every anchor of a Markdown page: its headings (outside code fences) and ``<a id=...>``."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            base = github_anchor(heading.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            anchors.add(base if count == 0 else f"{base}-{count}")
        anchors.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", line))
    return anchors


DOC_REF = re.compile(r"(?<![\w.])(?:docs/)?(" + "|".join(DOC_PAGES) + r")\.md#([\w-]+)")


# -- the checker itself can fail ------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "see ../shared/spec/vpl.md", "spec ``cpal.md`` section 2.1", "(vpl.md section 12)",
    "fix upstream quirk Q7 (last box row)", "crf image (Q10, default)", "Q-A targets",
    "the drop-in of issue 7", "issue #12", "(spec 2.2)", "spec checks 2-10", "the spec's reading",
    "defaults: spec 8.8", "(clip_es.md s.10)", "``shared/spec/clip_es.md``",
])
def test_forbidden_patterns_catch_outside_references(text):
    assert find_forbidden(text), text


@pytest.mark.parametrize("text", [
    "see docs/vpl.md#targets", "[VPL](vpl.md#map-modes)", "(docs/upstream_clip_es.md#crf-image)",
    "backbone spec must be a non-empty string", "Build a frozen backbone from a spec string.",
    "VOC subset at ../shared/data/voc2012_subset/VOC2012", "--box-clip-fix",
    "upstream_clip_es.md and clip_cpal.md", "open issues are listed on GitHub",
])
def test_allowed_text_passes(text):
    assert find_forbidden(text) == [], text


def test_github_anchor_rules():
    assert github_anchor("CLIP-CPAL + VPL") == "clip-cpal--vpl"
    assert github_anchor("Step rule and what `lr` means") == "step-rule-and-what-lr-means"
    assert github_anchor("`--config FILE.yaml`") == "--config-fileyaml"
    assert github_anchor("Class-aware attention affinity (CAA)") == "class-aware-attention-affinity-caa"


# -- the repository -------------------------------------------------------------------------------

def test_no_references_outside_the_repository():
    files = _tracked_text_files()
    assert len(files) > 50, "the scan found too few tracked text files to be meaningful"
    hits = []
    for path in files:
        for lineno, line in _prose(path):
            for name in find_forbidden(line):
                hits.append(f"{path.relative_to(ROOT)}:{lineno}: {name}: {line.strip()[:120]}")
    assert not hits, ("text cites material a user does not have; refer to a docs/ page section or a "
                      "named switch instead:\n" + "\n".join(hits))


def test_cited_docs_anchors_exist():
    anchors = {page: page_anchors(DOCS / f"{page}.md") for page in DOC_PAGES}
    refs = 0
    missing = []
    for path in _tracked_text_files():
        in_docs = path.parent == DOCS
        for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            cites = [(page, anchor) for page, anchor in DOC_REF.findall(line)]
            if in_docs:  # links within the same page
                cites += [(path.stem, a) for a in re.findall(r"\]\(#([\w-]+)\)", line) if path.stem in anchors]
            for page, anchor in cites:
                refs += 1
                if anchor not in anchors[page]:
                    missing.append(f"{path.relative_to(ROOT)}:{lineno}: docs/{page}.md#{anchor}")
    assert refs >= 40, f"only {refs} docs anchors cited; the scan is not finding them"
    assert not missing, "anchors that no heading or <a id> of the page defines:\n" + "\n".join(missing)
