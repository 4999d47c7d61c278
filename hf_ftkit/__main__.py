"""``python -m hf_ftkit``: the CLI (also how ``accelerate launch -m hf_ftkit`` and ``torchrun -m hf_ftkit`` run it)."""

import sys

from hf_ftkit.cli.main import main

sys.exit(main())
