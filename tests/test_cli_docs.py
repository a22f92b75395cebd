"""README: a short first page; docs/settings.md: the CLI's own tables; no broken link."""

import re
from pathlib import Path

from distbelief.clidoc import END, SETTINGS, START, flags_markdown

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SETTINGS_MD = ROOT / SETTINGS
README_MAX_LINES = 180

# [text](target) and ![alt](target), not inside code; target up to a space or ")"
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def prose(text: str) -> str:
    """The text without fenced code blocks and code spans, where links are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file."""
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", FENCE.sub("", path.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower())
        out.add(slug.replace(" ", "-"))
    return out


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor})")
    return broken


def test_settings_tables_match_the_cli():
    text = SETTINGS_MD.read_text()
    section = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert section == flags_markdown().strip(), "run: python -m distbelief.clidoc"


def test_settings_show_no_click_sentinel():
    text = SETTINGS_MD.read_text()
    assert "Sentinel" not in text and "UNSET" not in text
    # every switch shows what it is when not given
    assert "| `--json` | `DISTBELIEF_JSON` | `off` |" in text


def test_readme_opens_with_the_two_commands():
    lines = [line for line in README.read_text().splitlines() if line.strip()]
    assert lines[2].startswith("make demo") and lines[3].startswith("make test")


def test_readme_is_a_first_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move detail to docs/"
    )


def test_readme_links_the_docs():
    links = set(LINK.findall(prose(README.read_text())))
    for doc in ("settings", "operations", "training", "metrics", "staleness", "benchmarks"):
        assert f"docs/{doc}.md" in links, doc
    assert "bench/RESULTS.md" in links


def test_every_relative_link_points_to_an_existing_file():
    broken = {
        str(path.relative_to(ROOT)): links
        for path in markdown_files()
        if (links := broken_links(path))
    }
    assert not broken, broken


def test_the_link_check_finds_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# Here we are\n")
    page.write_text(
        "[ok](there.md) [ok](there.md#here-we-are) [web](https://example.com)\n"
        "`[not a link](nowhere.md)`\n"
        "```\n[not a link either](nowhere.md)\n```\n"
        "[gone](missing.md) [bad anchor](there.md#nope)\n"
    )
    assert broken_links(page) == ["missing.md (no such file)", "there.md#nope (no heading #nope)"]
