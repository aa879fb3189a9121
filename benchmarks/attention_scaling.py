"""Attention scaling benchmark; the same as `formers bench attention` (see formers/bench/attention.py)."""

import sys

from formers.bench.attention import main

if __name__ == "__main__":
    sys.exit(main())
