"""python -m med3d_ext.train (see med3d_ext.train.cli)."""

import sys

try:
    from .cli import main

    code = main()
except KeyboardInterrupt:  # Ctrl-C while torch loads (seconds) or before the command's own
    # handling starts: a word, not an import traceback (the training loop saves and says more)
    print("interrupted", file=sys.stderr)
    code = 130
sys.exit(code)
