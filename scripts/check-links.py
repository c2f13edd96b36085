#!/usr/bin/env python3
"""Checks that every relative link in the repository's Markdown files resolves: the file or
folder exists, and a `#fragment` names a heading of the target (GitHub's anchor rules).

    scripts/check-links.py        # exit 1 and one line per broken link, else "N links ok"
"""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
LINK = re.compile(r"\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~)")


def markdown_files():
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "*.md"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    return [ROOT / p for p in out.split() if (ROOT / p).is_file()]


def prose(path):
    """The file's lines outside fenced code blocks."""
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            yield line


def anchors(path):
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to '-', repeats numbered."""
    seen, out = {}, set()
    for line in prose(path):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1)).strip().lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def main():
    broken, checked = [], 0
    for md in markdown_files():
        for line in prose(md):
            for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                    continue  # http:, mailto:, …
                checked += 1
                file, _, fragment = target.partition("#")
                dest = (md.parent / file).resolve() if file else md
                rel = md.relative_to(ROOT)
                if not dest.exists():
                    broken.append(f"{rel}: {target}: no such file")
                elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
                    broken.append(f"{rel}: {target}: no heading #{fragment}")
    for b in broken:
        print(b)
    if broken:
        return 1
    print(f"{checked} links ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
