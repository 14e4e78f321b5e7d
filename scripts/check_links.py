"""Check that every relative link and image in markdown files points to a file that exists, and that a
#fragment names a heading of the file it points to (GitHub's anchors).

    python3 scripts/check_links.py                    # README.md, docs/*.md, benchmarks/README.md
    python3 scripts/check_links.py FILE.md ...

Exit status 1 if any link is broken. Links inside fenced code blocks and to URLs (http:, mailto:, ...)
are not checked.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")), "benchmarks/README.md"]
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def blank_code(text: str) -> str:
    """The text with fenced code blocks blanked out, line numbers kept."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def anchors(path: Path) -> set[str]:
    """GitHub's anchor for each heading: lower case, punctuation dropped, spaces as hyphens."""
    found: set[str] = set()
    for title in HEADING.findall(blank_code(path.read_text(encoding="utf-8"))):
        title = re.sub(r"`|\*|_(?=\w)|(?<=\w)_", "", title)
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        base, n = slug, 1
        while slug in found:
            slug, n = f"{base}-{n}", n + 1
        found.add(slug)
    return found


def check(name: str) -> int:
    path = (ROOT / name) if not Path(name).is_absolute() else Path(name)
    text = blank_code(path.read_text(encoding="utf-8"))
    bad = 0
    for m in LINK.finditer(text):
        target = m.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue
        file_part, _, fragment = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        line = text.count("\n", 0, m.start()) + 1
        if not resolved.exists():
            print(f"{name}:{line}: missing {target}")
            bad += 1
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            print(f"{name}:{line}: no heading #{fragment} in {file_part or name}")
            bad += 1
    return bad


def main() -> int:
    names = sys.argv[1:] or DEFAULT
    bad = sum(check(name) for name in names)
    print(f"{bad} broken link(s) in {len(names)} file(s)" if bad else f"all links resolve in {len(names)} file(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
