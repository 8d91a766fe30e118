"""`python -m embedder` is the `embedder` command."""

import sys

from embedder.cli import main

if __name__ == "__main__":
    sys.exit(main())
