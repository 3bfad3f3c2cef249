"""The README's Layout section names every module and benchmark in the tree, and every module's
first line says what it holds (a docstring), so the map cannot drift from the territory."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "vllm_faultsim"


def layout_block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```\n(.*?)```", section, re.S).group(1)


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")


def test_layout_names_every_module_and_benchmark():
    block = layout_block()
    named = set(re.findall(r"[\w.]+\.py\b", block))
    missing = [str(p.relative_to(ROOT)) for p in modules() + sorted((ROOT / "benchmarks").glob("*.py"))
               if p.name not in named]
    assert not missing, f"README Layout does not name: {missing}"


def test_every_module_says_what_it_holds():
    silent = [str(p.relative_to(ROOT)) for p in modules()
              if not (ast.get_docstring(ast.parse(p.read_text(encoding="utf-8"))) or "").strip()]
    assert not silent, f"modules without a first line saying what they hold: {silent}"
