"""``python -m ext_authz.dev``: the development commands, including ``echo`` and ``stack``."""

import sys

from ext_authz.dev.cli import main

sys.exit(main())
