"""`python -m geobp` runs the same entry point as the `geobp` console script."""

from geobp.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
