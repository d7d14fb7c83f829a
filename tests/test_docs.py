"""The documentation builds and stays whole: `mkdocs build --strict` passes (every page of
docs/ in the navigation, every link and anchor leading somewhere) and fails on a page, a
link or an anchor that does not; the README's links into docs/ reach real pages and
anchors, its contents list names every page, and both tables of config groups name every
option of conf/. The build needs the `docs` extra and skips without it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

DOCS = REPO / "docs"
README = (REPO / "README.md").read_text()
PAGES = sorted(p.stem for p in DOCS.glob("*.md"))
# docs/X.md or docs/X.md#anchor, as a Markdown link target
LINK = re.compile(r"\]\(docs/([\w-]+)\.md(?:#([\w-]+))?\)")


def section(text: str, title: str) -> str:
    """The body of the `## title` section of a Markdown text."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, title
    return match.group(1)


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    # NO_MKDOCS_2_WARNING: Material's notice about its successor, printed on every build
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(config), "--site-dir", str(site)], capture_output=True, text=True,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, timeout=300)


def test_the_site_builds_strict_and_the_readmes_links_reach_it(tmp_path):
    site = tmp_path / "site"
    built = mkdocs_build(REPO / "mkdocs.yml", site)
    assert built.returncode == 0, built.stderr
    for page, anchor in LINK.findall(README):
        html = site / ("index.html" if page == "index" else f"{page}/index.html")
        assert html.is_file(), f"docs/{page}.md"
        if anchor:
            assert f'id="{anchor}"' in html.read_text(), f"docs/{page}.md#{anchor}"


@pytest.mark.parametrize("page, text, words", [
    ("unlisted.md", "# A page left out of the navigation\n", "not included in the \"nav\""),
    ("index.md", "\n[a link](nowhere.md)\n", "nowhere.md"),
    ("index.md", "\n[an anchor](configuration.md#no-such-heading)\n", "no-such-heading"),
], ids=["page-not-in-nav", "broken-link", "broken-anchor"])
def test_the_strict_build_fails_on_what_leads_nowhere(tmp_path, page, text, words):
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    with (tmp_path / "docs" / page).open("a") as f:
        f.write(text)
    built = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert built.returncode != 0 and words in built.stderr, built.stderr


def test_the_readmes_contents_list_every_page():
    listed = {page for page, _ in LINK.findall(section(README, "Documentation"))}
    assert listed == set(PAGES)


@pytest.mark.parametrize("text", [section(README, "Config groups"),
                                  (DOCS / "configuration.md").read_text()],
                         ids=["README", "docs/configuration.md"])
def test_the_tables_of_config_groups_name_every_option(text):
    for group in sorted(p for p in (REPO / "conf").iterdir() if p.is_dir() and p.name != "hydra"):
        row = re.search(rf"^\| `{group.name}/` \|(.*)$", text, re.M)
        assert row, group.name
        for option in sorted(y.stem for y in group.glob("*.yaml")):
            assert f"`{option}`" in row.group(1), f"{group.name}={option}"
