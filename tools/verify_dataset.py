#!/usr/bin/env python
"""Check a converted dataset against its manifest: every file's size and sha256, every shard and .beton
re-read, per-class counts, labels, and the DALI and FFCV copies of each split compared sample by sample.

    python tools/verify_dataset.py OUT [--decode]

Exits 0 when everything matches, 1 and one line per problem otherwise.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402

from pipelines.formats.manifest import DatasetError  # noqa: E402
from pipelines.formats.verify import verify  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the converter's output directory")
    p.add_argument("--decode", action="store_true", help="also decode every stored image fully (slower)")
    args = p.parse_args(argv)
    console = Console(stderr=True, soft_wrap=True)
    try:
        with console.status("verifying") as status:
            problems = verify(args.out, decode=args.decode, tick=lambda what: status.update(f"verifying {what}"))
    except DatasetError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        return 1
    for problem in problems:
        console.print(f"[red]problem:[/red] {problem}", highlight=False)
    if problems:
        console.print(f"{args.out}: {len(problems)} problem(s) found")
        return 1
    console.print(f"{args.out}: OK, every file, count and label matches the manifest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
