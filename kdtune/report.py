"""``python -m kdtune.report``: the same as ``kdtune report`` (:mod:`kdtune.cli.report`); the
report itself is :mod:`kdtune.analysis.report`."""
import sys

if __name__ == "__main__":
    from kdtune.cli import main

    sys.exit(main(["report", *sys.argv[1:]]))
