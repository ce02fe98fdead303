"""The README and docs/: every relative link resolves, and the README's commands parse."""

import re
import shlex
from pathlib import Path

from memdec.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_BYTES = 12_000

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
_EXTERNAL = ("http://", "https://", "mailto:")


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where a link is not a link."""
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def links(page: Path) -> list[str]:
    """Every link target of a Markdown page, in order."""
    return _LINK.findall(prose(page.read_text(encoding="utf-8")))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings, duplicates numbered as GitHub numbers them."""
    seen: dict[str, int] = {}
    out = set()
    for heading in _HEADING.findall(_FENCE.sub("", page.read_text(encoding="utf-8"))):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """The relative links of ``page`` whose file, or heading in that file, does not exist (paths from ``root``)."""
    bad = []
    for target in links(page):
        if target.startswith(_EXTERNAL):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{page.relative_to(root)}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{page.relative_to(root)}: {target} (no such heading)")
    return bad


def memdec_commands(text: str, tables: bool = False) -> list[str]:
    """The ``memdec ...`` command lines of a page: in bash blocks (backslash lines joined) and, with
    ``tables``, the inline-code commands of its table rows."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("memdec "):
                commands.append(line)
    if tables:
        rows = "\n".join(line for line in text.splitlines() if line.startswith("|"))
        commands += [c.strip("`") for c in _INLINE_CODE.findall(rows) if c.startswith("`memdec ")]
    return commands


def test_every_relative_link_resolves():
    assert len(PAGES) > 5
    assert sum(len(links(p)) for p in PAGES) > 30  # the parser finds the links there are
    bad = [line for page in PAGES for line in broken_links(page)]
    assert bad == []


def test_the_link_check_finds_a_broken_link(tmp_path):
    (tmp_path / "there.md").write_text("# A heading, with `code`\n\n## Twice\n\n## Twice\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](there.md) [ok](there.md#a-heading-with-code) [ok](there.md#twice-1) [ok](https://example.com/x)\n"
        "`[not a link](gone.md)`\n```\n[not a link](gone.md)\n```\n"
        "[bad](gone.md) [bad](there.md#nowhere)\n", encoding="utf-8")
    assert broken_links(page, tmp_path) == ["page.md: gone.md (no such file)",
                                            "page.md: there.md#nowhere (no such heading)"]


def test_the_readme_is_a_short_guide():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.encode("utf-8")) < README_MAX_BYTES
    assert "make test" in text and "make demo" in text


def test_every_command_in_the_readme_parses():
    parser = build_parser()
    commands = memdec_commands((ROOT / "README.md").read_text(encoding="utf-8"), tables=True)
    commands += memdec_commands((ROOT / "docs" / "commands.md").read_text(encoding="utf-8"))
    named = {shlex.split(c)[1] for c in commands}
    assert named >= {"adapt", "datastore", "train", "transfer", "baseline", "eval", "generate", "serve", "tasks",
                     "lm-eval"}
    for command in commands:
        args, rest = parser.parse_known_args(shlex.split(command)[1:])
        assert rest == [] or args.command == "lm-eval", command
