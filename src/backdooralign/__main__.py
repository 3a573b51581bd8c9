"""``python -m backdooralign`` (also under ``accelerate launch -m backdooralign``)."""

import sys

from .cli import main

sys.exit(main())
