"""`python -m fedlora_ext ...` is the `fedlora` command line."""

import sys

from fedlora_ext.cli import main

sys.exit(main())
