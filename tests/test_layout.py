"""The package stays one that a newcomer reads at a glance (issue #11): README's Layout names every module, no module
is over 250 lines, no function over 50. Pure text, no training."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted((ROOT / "sft_lora").glob("*.py"))


def test_readme_layout_lists_every_module_and_no_other():
    layout = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", (ROOT / "README.md").read_text(encoding="utf-8"),
                       flags=re.M | re.S).group(1)
    listed = set(re.findall(r"^  (\w+\.py)\s", layout, flags=re.M))
    assert listed == {m.name for m in MODULES} - {"__init__.py"}


def test_no_module_over_250_lines_and_no_function_over_50():
    too_long = []
    for module in MODULES:
        text = module.read_text(encoding="utf-8")
        if len(text.splitlines()) > 250:
            too_long.append(f"{module.name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if node.end_lineno - start + 1 > 50:
                    too_long.append(f"{module.name}:{node.lineno} {node.name}: {node.end_lineno - start + 1} lines")
    assert not too_long, too_long


def test_every_module_the_docs_name_exists():
    names = {m.stem for m in MODULES}
    for doc in [ROOT / "README.md", ROOT / "README.ko.md", ROOT / "Makefile", *(ROOT / "docs").glob("*.md")]:
        text = doc.read_text(encoding="utf-8")
        named = set(re.findall(r"sft_lora/(\w+)\.py", text)) | set(re.findall(r"sft_lora\.(\w+)", text))
        assert named <= names, f"{doc.name} names {sorted(named - names)}, which sft_lora/ no longer has"
