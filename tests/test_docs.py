"""The docs are rendered from what they describe and their links lead somewhere."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import render

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "DESIGN.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def test_rendered_docs_are_current():
    """In a process of its own: what other tests leave in module state must not change the help texts."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.render", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_readme_is_short_and_every_figure_block_is_filled():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    blocks = re.findall(r"<!-- render:([\w-]+) -->\n(.*?)<!-- /render:\1 -->", text, flags=re.S)
    assert {name for name, _ in blocks} == set(render.README_BLOCKS)
    assert all("Measured on" in body for _, body in blocks)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    headings = [line.lstrip("#").strip() for line in _prose(path.read_text()).splitlines() if line.startswith("#")]
    return {_slug(h) for h in headings}


def _prose(text: str) -> str:
    """The text outside code fences and inline code, where links are links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page: Path):
    broken = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def test_a_results_file_without_provenance_is_refused(tmp_path, monkeypatch):
    (tmp_path / "x.json").write_text(json.dumps({"rows": [], "machine": {}}))
    monkeypatch.setattr(render, "RESULTS", tmp_path)
    with pytest.raises(SystemExit, match="x.json: no date, commit, command"):
        render.load("x.json")


def test_superseded_rows_are_not_rendered():
    row = {
        "recipe": "recipes/a.yaml",
        "method": "rtn 4-bit",
        "texts": {"prose": {"perplexity_delta_pct": 1.0}},
        "weights_mb": 1.0,
        "build_seconds": 1,
    }
    result = {
        "date": "2026-01-01",
        "commit": "abc",
        "command": "c",
        "machine": {"cpu": "x", "cores": 2},
        "_file": "benchmarks/results/x.json",
        "rows": [row, {**row, "recipe": "recipes/old.yaml", "superseded": "rerun after a fix"}],
    }
    table = render.recipes_table(result)
    assert "recipes/a.yaml" in table and "recipes/old.yaml" not in table
    assert "Measured on x, 2 cores; 2026-01-01, commit abc" in table
