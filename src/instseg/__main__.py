"""``python -m instseg ...`` = the ``instseg`` command; what ``torchrun -m instseg train ...`` runs."""

import sys

from instseg.cli import main

if __name__ == "__main__":
    sys.exit(main())
