"""The documentation holds together: the README stays a front door, and every relative link and image in the
README, docs/ and benchmarks/README.md points at a file that exists (a moved file or a renamed page shows here)."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO

README_MAX_LINES = 250

# inline links and images, [text](target) and ![alt](target), the target up to an optional "title"
INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'(][^)]*)?\s*\)")
# reference definitions, [label]: target
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
EXTERNAL = ("http://", "https://", "mailto:")


def documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]


def link_targets(markdown_text: str) -> list[str]:
    """Every link and image target of a Markdown text, outside code blocks and code spans."""
    text = CODE_SPAN.sub("", FENCE.sub("", markdown_text))
    return INLINE.findall(text) + REFERENCE.findall(text)


def broken_links(markdown_text: str, base_dir: Path, root: Path = REPO) -> list[str]:
    """The relative link and image targets in ``markdown_text`` that name no file or folder under ``root`` (the
    repository), read from ``base_dir`` (the Markdown file's folder); #anchors are stripped, http(s) and mailto
    links skipped. A target that leaves ``root`` is broken too: it would not resolve in anyone else's clone."""
    broken = []
    for target in link_targets(markdown_text):
        if target.lower().startswith(EXTERNAL):
            continue
        path = target.split("#", 1)[0].split("?", 1)[0]
        if not path:  # an anchor in the same page
            continue
        resolved = (base_dir / path).resolve()
        if not resolved.is_relative_to(root.resolve()) or not resolved.exists():
            broken.append(target)
    return broken


def test_readme_is_a_front_door():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, \
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move the detail into a page of docs/"


def test_every_relative_link_and_image_resolves():
    assert (REPO / "docs").is_dir(), "docs/ is missing"
    problems = []
    for doc in documents():
        assert doc.is_file(), f"{doc.relative_to(REPO)} is missing"
        for target in broken_links(doc.read_text(encoding="utf-8"), doc.parent):
            problems.append(f"{doc.relative_to(REPO)}: ({target})")
    assert not problems, "links to files that do not exist:\n" + "\n".join(problems)


def test_a_planted_broken_link_is_reported(tmp_path):
    """broken_links finds what the test above looks for: a planted link to a missing page, image or reference,
    and one that leaves the repository, among good links, anchors, web links and code that only looks like links."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (tmp_path / "README.md").write_text("# front door\n")
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "image.png").write_bytes(b"")
    (docs / "page.md").write_text("# a page\n")
    text = "\n".join([
        "The [front door](../README.md#install), ![an image](../assets/image.png), [a page](page.md \"title\"),",
        "[the same page](#anchor-only), [the web](https://example.org) and [mail](mailto:someone@example.org).",
        "A [missing page](no-such-page.md#anchor) and a ![missing image](../assets/no-such-image.png).",
        "[ref]: ../docs/no-such-reference.md",
        "[out of the repository](../../outside.md)",
        "`[in a code span](not-a-link.md)`",
        "```markdown",
        "[in a code block](not-a-link-either.md)",
        "```",
    ])
    assert broken_links(text, docs, root=tmp_path) == [
        "no-such-page.md#anchor", "../assets/no-such-image.png", "../../outside.md", "../docs/no-such-reference.md"]
    assert broken_links("[fine](page.md) ![fine](../assets/image.png)", docs, root=tmp_path) == []


def test_the_generated_tables_of_metrics_and_modes_are_current():
    """docs/extending.md carries the tables the registries generate: a metric or mode added without them fails."""
    from utils.evaluation.metrics import metrics_markdown
    from utils.inference.modes import modes_markdown

    text = (REPO / "docs" / "extending.md").read_text()
    assert metrics_markdown() in text
    assert modes_markdown() in text


def test_the_generated_registry_table_of_models_md_is_current():
    """docs/models.md carries the table REGISTRIES generates: an entry added to a registry (as the `ae` objective and
    the `none` and `aae` regularisers once were, and went unlisted) fails here until the table is regenerated."""
    from utils.config import REGISTRIES, registries_markdown

    table = registries_markdown()
    assert table in (REPO / "docs" / "models.md").read_text(), \
        "docs/models.md's registry table is stale: paste in the output of python -m utils.config registries"
    rows = dict(re.findall(r"^\| `([a-z_.]+)` \|[^|]*\|[^|]*\| (.*) \|$", table, re.MULTILINE))
    for key, registry in REGISTRIES.items():  # the generator lists every entry of every registry, and only those
        assert rows[key] == ", ".join(f"`{entry}`" for entry in registry)
