"""``python -m larder`` is the ``larder`` command."""

import sys

from larder.service.cli import main

sys.exit(main())
