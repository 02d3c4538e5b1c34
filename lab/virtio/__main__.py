"""`python -m lab.virtio ...` (or the zipapp labvirtio.pyz): the userspace driver's command line."""

import sys

from .cli import main

sys.exit(main())
