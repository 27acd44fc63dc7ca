"""Entry point of the `imageswarm` command."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    raise SystemExit("imageswarm: not yet built")
