"""``python -m minimoe.gpu_check``: the one command for a GPU machine (:mod:`minimoe.tools.gpu_check`)."""

import sys

from .tools.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
