"""What each kind of work costs in formers' LM training step, measured by taking it out (issue 10): GELU, fc1's bias,
the LayerNorms, the AdamW update and the attention kernel, each removed outright (a timing bound, not a model),
interleaved with the unchanged step and x-transformers `attn_flash=True`.

    python benchmarks/step_oracles.py [--oracles ...] [--reps 41] [--steps 1] [--threads N]
                                      [--out results/step_oracles.json]

The code and the definitions are in formers/bench/oracles.py. Run it on an idle machine.
"""

import sys

from formers.bench.oracles import main

if __name__ == "__main__":
    sys.exit(main())
