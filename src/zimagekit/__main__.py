"""``python -m zimagekit``, which is how torchrun starts the command:
``torchrun --nproc_per_node=8 -m zimagekit train --config ...``."""

import sys

from .cli import main

sys.exit(main())
