"""`python -m cellavie_hpc` is the `cellavie` command."""
import sys

from cellavie_hpc.cli import main

if __name__ == "__main__":  # generator workers started with "spawn" re-import this module
    sys.exit(main())
