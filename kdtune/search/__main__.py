import sys

from kdtune.search.cli import main

sys.exit(main())
