"""``python -m zimage_stream``: the same command line as ``zimage-stream``."""

import sys

from .cli import main

sys.exit(main())
