"""``python -m kdtune.cli``: the ``kdtune`` command."""
import sys

from kdtune.cli import main

sys.exit(main())
