"""python -m med3d_ext.train (see med3d_ext.train.cli)."""

import sys

from .cli import main

sys.exit(main())
