"""The README and docs/ hold together: every link lands, every setting is documented, the README stays short."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

from i2v_daemon.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"

#: A newcomer reads the README in five minutes; the rest lives in docs/.
README_MAX_LINES = 300

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a `# comment` in a shell example is no heading, a `](` no link)."""
    out: list[str] = []
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (not `-` or `_`), spaces to hyphens."""
    text = _INLINE_CODE.sub(lambda m: m.group(2), heading)  # `on_finish` reads as on_finish
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its words
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every `#anchor` a page offers: its headings' slugs, with GitHub's -1, -2 for repeats."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in _prose_lines(page.read_text(encoding="utf-8")):
        m = _HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    """The link and image targets in a page's prose (not in code)."""
    out: list[str] = []
    for line in _prose_lines(page.read_text(encoding="utf-8")):
        line = _INLINE_CODE.sub(lambda m: "code" if "](" in m.group(2) else m.group(0), line)
        out.extend(m.group(1) for m in _LINK.finditer(line))
    return out


def broken(page: Path, target: str) -> str | None:
    """Why a relative link from `page` does not land, or None when it does (external links are not followed)."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
        return None
    path_part, _, anchor = target.partition("#")
    dest = (page.parent / unquote(path_part)).resolve() if path_part else page
    if not dest.exists():
        return f"{dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest} does not exist"
    if anchor:
        if dest.suffix != ".md":
            return f"#{anchor} points into {dest.name}, which has no headings"
        if anchor not in anchors(dest):
            return f"#{anchor} is no heading of {dest.relative_to(ROOT)} (it has: {sorted(anchors(dest))})"
    return None


def test_every_link_in_the_readme_and_docs_resolves() -> None:
    checked, problems = 0, []
    for page in _pages():
        for target in links(page):
            checked += 1
            why = broken(page, target)
            if why:
                problems.append(f"{page.relative_to(ROOT)}: ({target}): {why}")
    assert checked > 20, f"only {checked} links found: is the link pattern still matching?"
    assert not problems, "\n".join(problems)


def test_the_readme_links_every_docs_page() -> None:
    pages = sorted(DOCS.glob("*.md"))
    assert pages, "docs/ has no pages"
    linked = {(README.parent / unquote(t.partition("#")[0])).resolve() for t in links(README)}
    assert [p.name for p in pages if p.resolve() not in linked] == []


def test_the_link_checker_catches_a_missing_file_and_a_missing_heading() -> None:
    assert broken(README, "docs/no-such-page.md") is not None
    assert broken(README, "docs/configuration.md#no-such-heading") is not None
    assert broken(README, "docs/configuration.md#presets") is None
    assert broken(README, "https://example.org/nowhere") is None


def test_headings_become_github_anchors() -> None:
    assert slug("After a job: the `on_finish` hook") == "after-a-job-the-on_finish-hook"
    assert slug("Smooth video: frame interpolation") == "smooth-video-frame-interpolation"
    assert slug("The fast path (`accelerate`)") == "the-fast-path-accelerate"
    assert slug("Several GPUs and several hosts") == "several-gpus-and-several-hosts"


def test_every_setting_is_in_the_configuration_reference_with_its_environment_variable() -> None:
    text = CONFIGURATION.read_text(encoding="utf-8")
    prefix = Settings.model_config.get("env_prefix", "")
    fields = list(Settings.model_fields)
    assert len(fields) > 40, f"Settings has only {len(fields)} fields: is this the right class?"
    missing = [name for name in fields if f"`{name}`" not in text]
    assert missing == [], f"settings not in docs/configuration.md: {missing}"
    no_env = [name for name in fields if f"`{prefix}{name.upper()}`" not in text]
    assert no_env == [], f"environment variables not in docs/configuration.md: {[prefix + n.upper() for n in no_env]}"


def test_the_configuration_reference_lists_no_setting_that_does_not_exist() -> None:
    prefix = Settings.model_config.get("env_prefix", "")
    rows = re.findall(rf"^\| `(\w+)` \| `{prefix}(\w+)` \|", CONFIGURATION.read_text(encoding="utf-8"), re.MULTILINE)
    assert len(rows) > 40, "the settings tables were not found"
    assert [name for name, env in rows if name not in Settings.model_fields or env != name.upper()] == []


def test_the_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert 0 < lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"
