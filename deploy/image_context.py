"""The files `docker build -f deploy/Dockerfile .` sends as its build context.

Applies deploy/Dockerfile.dockerignore the way BuildKit does (moby's patternmatcher): patterns are
cleaned paths relative to the context root, `*` and `?` stay within one path component, `**` spans
any number of them, a pattern also matches everything under a directory it matches, `!` re-admits,
and the last pattern that matches a path decides.

    python3 deploy/image_context.py list           # the admitted files, one per line
    python3 deploy/image_context.py copy DEST      # mirror them into DEST (stale files removed)

Candidates are the files git knows (tracked, plus untracked ones that .gitignore does not hide), so
the result is what a clean clone would send; no container engine is needed.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IGNORE = REPO / "deploy" / "Dockerfile.dockerignore"


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """A cleaned dockerignore pattern as a regular expression over slash-separated paths."""
    out = "^"
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            if i + 1 < len(pattern) and pattern[i + 1] == "*":
                i += 1
                if i + 1 < len(pattern) and pattern[i + 1] == "/":
                    i += 1
                    out += "(.*/)?"
                else:
                    out += ".*"
            else:
                out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + "$")


def parse(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(is_exception, pattern) for every rule, in order."""
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        if exception:
            line = line[1:].strip()
        line = posixpath.normpath(line).lstrip("/")
        if line in ("", "."):
            continue
        rules.append((exception, compile_pattern(line)))
    return rules


def admitted(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether `path` (relative, slash-separated) is in the build context."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    keep = True
    for exception, pattern in rules:
        if any(pattern.match(p) for p in prefixes):
            keep = exception
    return keep


def candidates() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout.decode()
    return sorted({p for p in out.split("\0") if p and (REPO / p).is_file()})


def context_files() -> list[str]:
    rules = parse(IGNORE.read_text())
    return [p for p in candidates() if admitted(p, rules)]


def copy(dest: Path) -> int:
    files = context_files()
    wanted = set(files)
    dest.mkdir(parents=True, exist_ok=True)
    # Leave target/ alone if the caller builds in place; remove whatever the context no longer has.
    for root, dirs, names in os.walk(dest, topdown=True):
        rel_root = os.path.relpath(root, dest)
        dirs[:] = [d for d in dirs if not (rel_root == "." and d == "target")]
        for name in names:
            rel = os.path.normpath(os.path.join(rel_root, name)).replace(os.sep, "/")
            if rel not in wanted:
                os.remove(os.path.join(root, name))
    for rel in files:
        src, dst = REPO / rel, dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        # Unchanged files keep their mtime, so cargo's fingerprints stay fresh between runs.
        if not dst.exists() or dst.read_bytes() != src.read_bytes():
            shutil.copy2(src, dst)
    return len(files)


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[1] == "list":
        print("\n".join(context_files()))
        return 0
    if len(argv) == 3 and argv[1] == "copy":
        n = copy(Path(argv[2]))
        print(f"{n} files in the build context")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
