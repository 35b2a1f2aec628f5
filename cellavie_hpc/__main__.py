"""`python -m cellavie_hpc` is the `cellavie` command."""
import sys

from cellavie_hpc.cli import main

sys.exit(main())
