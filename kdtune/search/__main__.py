import sys

from kdtune.search.driver import main

sys.exit(main())
