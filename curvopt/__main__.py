"""``python -m curvopt``: the ``curvopt`` command."""

import sys

from curvopt.cli import main

sys.exit(main())
