from pathlib import Path

from distbelief.clidoc import END, START, flags_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_settings_tables_match_the_cli():
    text = README.read_text()
    section = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert section == flags_markdown().strip(), "run: python -m distbelief.clidoc"


def test_readme_opens_with_the_two_commands():
    lines = [line for line in README.read_text().splitlines() if line.strip()]
    assert lines[2].startswith("make demo") and lines[3].startswith("make test")
