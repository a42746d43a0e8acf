"""README.md stands alone: every relative link resolves inside the repository (a clone has
nothing beside it), every #anchor names one of its headings, and it names no path outside."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(m) for m in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)}


def links(text: str) -> list[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold commands, not links
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text) + re.findall(r"<a\s[^>]*href=\"([^\"]+)\"", text)


def test_every_relative_link_resolves_inside_the_repository():
    found = links(README.read_text())
    assert found, "the README has links; the parser must find them"
    for target in found:
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        path = (README.parent / path_part).resolve() if path_part else README
        assert path.is_relative_to(ROOT), f"{target}: outside the repository"
        assert path.exists(), f"{target}: no such file in the repository"
        if anchor:
            assert path.suffix == ".md", f"{target}: an anchor into a non-Markdown file"
            assert anchor in anchors(path), f"{target}: no heading with that anchor"


def test_names_no_path_outside_the_repository():
    outside = re.findall(r"(?<![\w/.])\.\./[\w./-]+", README.read_text())
    assert outside == [], outside


def test_the_link_checker_catches_what_it_should(tmp_path):
    assert slug("Deploying on Kubernetes") == "deploying-on-kubernetes"
    assert slug("Debugging with `grpcurl`!") == "debugging-with-grpcurl"
    assert links("see [a](k8s/) and [b](#x) and [c](https://x.y) but not\n```\n[d](nope)\n```") == ["k8s/", "#x", "https://x.y"]
