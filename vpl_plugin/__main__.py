"""``python -m vpl_plugin`` runs the ``vpl`` command."""

import sys

from vpl_plugin.cli import main

sys.exit(main())
