"""Share of subnormal values in burn optimizer checkpoints (`optimizer.bpk`).

Usage: python3 scripts/subnormal_share.py PATH [PATH ...]

Reads each file as little-endian f32 words (the record's few header bytes are counted too, a
negligible error next to ~10^6 parameters) and prints how many are subnormal (non-zero, below
2^-126 in magnitude) and how many are exactly zero. Used for BENCHMARKS.md "Training step:
flushing subnormals". Needs numpy.
"""

import sys

import numpy as np

SMALLEST_NORMAL = np.finfo(np.float32).tiny


def main(paths):
    for path in paths:
        raw = open(path, "rb").read()
        words = np.frombuffer(raw[: len(raw) // 4 * 4], dtype="<f4")
        subnormal = (words != 0) & (np.abs(words) < SMALLEST_NORMAL)
        print(
            f"{path}: {words.size} words, subnormal {subnormal.mean():.1%}, zero {(words == 0).mean():.1%}"
        )


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
