"""``python -m lipnet.cli ...``: the ``lipnet`` command."""

import sys

from lipnet.cli.main import main

sys.exit(main())
