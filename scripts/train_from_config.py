"""The original project's entry point, kept working: ``python scripts/train_from_config.py CONFIG``.

Same as ``iceaggr train CONFIG [--set key=value ...]``.
"""

import sys

from iceaggr.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
