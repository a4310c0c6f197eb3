"""``python -m fxquant ...``: the same as the ``fxquant`` command."""
import sys

from .cli import main

sys.exit(main())
