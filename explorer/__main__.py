"""``python -m explorer``: the command line. The engine itself never imports ``cli``; only this entry does."""
import sys

from cli import main

sys.exit(main())
