"""`python -m services.cli ...` is `aepo ...`."""

import sys

from services.cli.main import main

sys.exit(main())
