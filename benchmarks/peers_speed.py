"""formers against the peers on the same models (issue 10): LM training step and cached generation vs
x-transformers, generation vs HF GPT-2, ViT-Tiny forward vs HF ViT, packed vs padded encoder, MFU of the LM rows.

    python benchmarks/peers_speed.py [--reps 9] [--steps 4] [--rows lm_train generate vit_forward packed_encoder]

The same as `formers bench speed` (formers/bench/speed.py, which documents the rules); writes
results/peers_speed.json, results/peers_speed.png and the performance section of README.md. Run it on an idle
machine: a second heavy process changes the ratios.
"""

import sys

from formers.bench.speed import main

if __name__ == "__main__":
    sys.exit(main())
