"""README.md stands alone: every relative link resolves inside the repository (a clone has
nothing beside it), every #anchor names one of its headings, and it names no path outside."""

from __future__ import annotations

import re
import shlex
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


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def commands(block: str) -> list[list[str]]:
    """Each command of a bash block as words: comments dropped, `\\` continuations joined, `&&` split."""
    text = re.sub(r"\\\n", " ", block)
    out = []
    for line in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        for part in filter(None, (p.strip() for p in line.split("&&"))):
            try:
                out.append(shlex.split(part))
            except ValueError:  # a quoted JSON body that a later line closes: its first words still tell
                out.append(part.split())
    return out


def test_quick_start_commands_resolve_as_written():
    """In a fresh shell, after the quick start, the README's `vlmesh ...` lines must find `vlmesh`:
    the quick start activates the venv (or names .venv/bin/ itself) before any bare `vlmesh`, and
    every `vlmesh SUBCOMMAND` the README shows is one the CLI has."""
    from services.cli import COMMANDS

    blocks = bash_blocks(README.read_text())
    quick, rest = blocks[0], blocks[1:]
    on_path = False
    scripts = {"vlmesh"}  # [project.scripts] in pyproject.toml
    assert "vlmesh = " in (ROOT / "pyproject.toml").read_text()
    for words in commands(quick):
        if words[:2] in ([".", ".venv/bin/activate"], ["source", ".venv/bin/activate"]):
            on_path = True
        elif words[0].startswith(".venv/bin/"):
            assert words[0].removeprefix(".venv/bin/") in {"pip", "python", *scripts}, words
        elif words[0] in scripts:
            assert on_path, f"{' '.join(words)}: `vlmesh` is not on PATH yet (no `. .venv/bin/activate` before it)"
    assert on_path, "the quick start never activates the venv, so the README's bare `vlmesh` lines would not resolve"
    shown = [words for block in rest for words in commands(block) if words and words[0] == "vlmesh"]
    assert shown, "the parser must find the README's vlmesh lines"
    for words in shown:
        assert words[1] in COMMANDS, f"{' '.join(words)}: no such vlmesh command"


def test_the_command_checker_catches_what_it_should():
    assert commands("a b && c  # note\nd \\\n  e") == [["a", "b"], ["c"], ["d", "e"]]
