"""README.ko.md carries what README.md's everyday sections say: commands, recipe keys, data formats, error lines
and the seed-flag table. Pure text, no training."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sft_lora.config import SEED_FLAGS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
README_KO = (ROOT / "README.ko.md").read_text(encoding="utf-8")


def _squash(text: str) -> str:
    """Whitespace runs as one space: a line wrapped differently is the same text."""
    return re.sub(r"\s+", " ", text).strip()


def _section(text: str, title: str) -> str:
    """The `## title…` section of a README, up to the next `## ` heading (fenced `#` comments do not end it)."""
    match = re.search(rf"^## {re.escape(title)}.*?(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"README.md has no '## {title}' section"
    return match.group(0)


def _fenced_lines(text: str, language: str) -> list[str]:
    """Non-empty lines of the text's ```language blocks, trailing `# comment` removed (comments are translated)."""
    lines = []
    for block in re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.M | re.S):
        for line in block.splitlines():
            code = re.sub(r"(^|\s)#\s.*$", "", line).rstrip()
            if code.strip():
                lines.append(code)
    return lines


def _flag_rows(text: str) -> dict[str, list[str]]:
    """Cells of each table row that starts with a seed flag, by flag (`\\|` inside a cell is not a separator)."""
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        match = re.match(r"\| `--(\w+)` \|", line)
        if match and match.group(1) in SEED_FLAGS:
            assert match.group(1) not in rows, f"--{match.group(1)} has two table rows"
            rows[match.group(1)] = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
    return rows


@pytest.mark.parametrize("title", ["Quick start", "Real use", "Command line"])
def test_every_command_line_is_in_the_korean_readme(title):
    commands = _fenced_lines(_section(README, title), "bash")
    assert commands, f"README.md '{title}' lost its commands"
    korean = set(_fenced_lines(README_KO, "bash"))
    missing = [c for c in commands if c not in korean]
    assert not missing, f"README.ko.md lacks these lines of README.md '{title}': {missing}"


def test_every_recipe_line_of_real_use_is_in_the_korean_readme():
    recipe = _fenced_lines(_section(README, "Real use"), "yaml")
    assert len(recipe) > 10
    korean = set(_fenced_lines(README_KO, "yaml"))
    missing = [line for line in recipe if line not in korean]
    assert not missing, f"README.ko.md's recipe lacks these lines of README.md's: {missing}"


@pytest.mark.parametrize("title", ["Data", "Bad input"])
def test_data_formats_and_error_lines_are_in_the_korean_readme(title):
    section = _section(README, title)
    prose = re.sub(r"^```.*?^```", "", section, flags=re.M | re.S)  # fenced examples: compared line by line below
    spans = [_squash(s) for s in re.findall(r"`([^`]+)`", prose)]
    assert len(spans) >= 8
    korean = _squash(README_KO)
    missing = [s for s in spans if s not in korean]
    assert not missing, f"README.ko.md lacks these from README.md '{title}': {missing}"
    for language in ("json", "yaml"):
        lines = set(_fenced_lines(README_KO, language))
        missing = [line for line in _fenced_lines(section, language) if line not in lines]
        assert not missing, f"README.ko.md lacks these {language} lines of README.md '{title}': {missing}"


def test_both_flag_tables_give_each_seed_flag_its_key_and_its_meaning_in_run_and_merge():
    english = _flag_rows(_section(README, "Command line"))
    korean = _flag_rows(README_KO)
    header = next(line for line in _section(README, "Command line").splitlines() if line.startswith("| flag |"))
    assert "sft_lora.run" in header and "sft_lora.merge" in header
    for name, rows in (("README.md", english), ("README.ko.md", korean)):
        assert set(rows) == set(SEED_FLAGS), f"{name}: flag table rows {sorted(rows)} != SEED_FLAGS"
        for flag, cells in rows.items():
            assert len(cells) == 4, f"{name}: --{flag} row needs flag | key | run | merge, got {cells}"
            assert cells[1] == f"`{SEED_FLAGS[flag]}`", f"{name}: --{flag} maps to {SEED_FLAGS[flag]}, not {cells[1]}"
            assert all(cells[2:]), f"{name}: --{flag} says nothing for run or merge"
    # the distinction users trip on: a root in run, the final directory in merge
    for rows, root, final in ((english, "root", "final directory"), (korean, "루트", "최종 디렉터리")):
        assert root in rows["output_dir"][2] and final in rows["output_dir"][3]
        assert "{model_name}/{num_epochs}" in rows["output_dir"][2]
