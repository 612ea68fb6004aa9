"""``python -m npipe.redirector``: see :mod:`npipe.redirector.service`."""

import sys

from npipe.redirector.service import main

sys.exit(main())
