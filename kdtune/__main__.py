"""``python -m kdtune``: the ``kdtune`` command (kdtune.cli)."""
import sys

from kdtune.cli import main

sys.exit(main())
