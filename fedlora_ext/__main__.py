"""`python -m fedlora_ext ...` is the `fedlora` command line."""

import sys

from fedlora_ext.app.cli import main

sys.exit(main())
