"""``python -m kdtune.report``: kept as the documented entry point; the report lives in
:mod:`kdtune.analysis.report`."""
import sys

from kdtune.analysis.report import main

if __name__ == "__main__":
    sys.exit(main())
