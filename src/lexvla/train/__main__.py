"""`python -m lexvla.train ...` (and `torchrun --nproc_per_node N -m lexvla.train ...`) = `lexvla train ...`."""

from __future__ import annotations

import sys

from lexvla.cli import main

if __name__ == "__main__":
    sys.argv = ["lexvla", "train", *sys.argv[1:]]
    main()
