"""Where the time goes (issue 10): the kernel floor of the LM training step and the ViT forward (only the matmuls,
the patch convolution and the flash-attention kernels, called directly), timed interleaved with formers and the peer,
and a profile of each side by op kind.

    python benchmarks/kernel_floor.py [--reps 9] [--steps 4] [--threads N] [--out results/kernel_floor.json]

The code and the definitions are in formers/bench/floor.py. Run it on an idle machine.
"""

import sys

from formers.bench.floor import main

if __name__ == "__main__":
    sys.exit(main())
