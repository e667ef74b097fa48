"""``python -m pymachined``: the pymachine CLI."""

from pymachined.cli import main

main()
