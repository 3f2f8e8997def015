"""``python -m sensisearch.cli``, as the single-module CLI allowed."""

import sys

from sensisearch.cli import main

sys.exit(main())
