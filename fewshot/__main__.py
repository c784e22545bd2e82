"""Entry point of ``python -m fewshot`` (see fewshot.cli)."""

import sys

from fewshot.cli import main

sys.exit(main())
