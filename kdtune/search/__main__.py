"""``python -m kdtune.search``: the same as ``kdtune search`` (kdtune.cli)."""
import sys

from kdtune.cli import main

sys.exit(main(["search", *sys.argv[1:]]))
