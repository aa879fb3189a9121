"""Long Range Arena (P29), offline; the same as `formers bench lra` (see formers/bench/lra.py for the options).

    python benchmarks/lra.py --mode lite            # 12 mixers x 5 tasks, resumable; results/lra/lite/
"""

import sys

from formers.bench.lra import main

if __name__ == "__main__":
    sys.exit(main())
