import sys

from recsys_mtl.cli import console

sys.exit(console())
