"""`python -m qvit ...` and `torchrun -m qvit train ...`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
