"""The README and ``docs/`` against the tree: the README stays short and links every page, no relative link is
dead (files and ``#anchors``), and every code name a page writes in backticks resolves (``ds_ext.x.y`` imports,
``ds_ext/x.py`` / ``configs/x.json`` / ... exist). Pages that drift from the code fail here, not in a user's hands."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200  # issue 30: a newcomer reads it in five minutes
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\n]+)`")
PATH = re.compile(r"^((?:ds_ext|benchmarks|configs|examples|scripts|tests|launcher|docs)/[\w./-]*\w)(?::\d+(?:-\d+)?)?$")
DOTTED = re.compile(r"^ds_ext(?:\.\w+)+$")


def pages() -> list:
    return [ROOT / "README.md", ROOT / "benchmarks" / "RESULTS.md"] + sorted((ROOT / "docs").glob("*.md"))


def _outside_code_blocks(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped (but ``-`` and ``_``), spaces to ``-``."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    heads = re.findall(r"^#{1,6} (.+)$", _outside_code_blocks(path.read_text(encoding="utf-8")), flags=re.M)
    return {slug(h) for h in heads}


def dead_links(path: Path) -> list:
    dead = []
    for target in LINK.findall(_outside_code_blocks(path.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z]+://|^mailto:", target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            dead.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            dead.append(f"{path.relative_to(ROOT)}: {target} (no heading with that anchor)")
    return dead


def config_paths() -> set:
    """Every JSON path of the ``"ds_ext"`` block (leaf keys and the sections above them)."""
    from ds_ext.config import DsExtConfig
    from ds_ext.config.reference import rows
    keys = {key.replace("[]", "") for key, *_ in rows(DsExtConfig)}
    return keys | {k.rsplit(".", n)[0] for k in keys for n in range(1, k.count("."))}


def _resolves(dotted: str) -> bool:
    """A config key (``ds_ext.asyncflow.lease_s``), or a module / attribute that imports."""
    if dotted in config_paths():
        return True
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
            return True
        except AttributeError:
            return False
    return False


def unresolved_names(path: Path) -> list:
    bad = []
    for code in CODE.findall(_outside_code_blocks(path.read_text(encoding="utf-8"))):
        code = code.strip().rstrip("()")
        m = PATH.match(code)
        if m and "*" not in code and "<" not in code and not (ROOT / m.group(1)).exists():
            bad.append(f"{path.relative_to(ROOT)}: `{code}` (no such file)")
        elif DOTTED.match(code) and not _resolves(code):
            bad.append(f"{path.relative_to(ROOT)}: `{code}` (does not import)")
    return bad


def test_readme_is_short_and_links_every_docs_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= README_MAX_LINES
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in LINK.findall(readme)}
    unlinked = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert unlinked == [], "docs pages the README does not link"


def test_no_dead_relative_link():
    dead = [d for p in pages() for d in dead_links(p)]
    assert dead == []


def test_every_code_name_in_the_docs_resolves():
    bad = [b for p in pages() for b in unresolved_names(p)]
    assert bad == []


def test_the_checkers_can_fail(tmp_path, monkeypatch):
    page = ROOT / "docs" / "__probe__.md"
    page.write_text("# Probe\n[x](nowhere.md) [y](config.md#no-such-anchor) [z](#probe)\n"
                    "`ds_ext.no_such_module` `ds_ext/no_such_file.py` `ds_ext.config.check_file` `ds_ext.noloco.no_key`\n"
                    "`ds_ext.noloco.inner_steps`\n")
    try:
        assert dead_links(page) == ["docs/__probe__.md: nowhere.md (no such file)",
                                    "docs/__probe__.md: config.md#no-such-anchor (no heading with that anchor)"]
        assert unresolved_names(page) == ["docs/__probe__.md: `ds_ext.no_such_module` (does not import)",
                                          "docs/__probe__.md: `ds_ext/no_such_file.py` (no such file)",
                                          "docs/__probe__.md: `ds_ext.noloco.no_key` (does not import)"]
    finally:
        page.unlink()
