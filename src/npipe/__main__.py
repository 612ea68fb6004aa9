import sys

from npipe.cli import main

sys.exit(main())
