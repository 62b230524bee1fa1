"""`python -m train`: see `train._cli` (or `python -m train --help`)."""

import sys

from train._cli import main

if __name__ == "__main__":
  sys.exit(main())
