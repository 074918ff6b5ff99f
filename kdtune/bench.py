"""``python -m kdtune.bench``: the same as ``kdtune bench`` (:mod:`kdtune.cli.bench`); the
measurements are :mod:`kdtune.benchmarks`."""
import sys

if __name__ == "__main__":
    from kdtune.cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
