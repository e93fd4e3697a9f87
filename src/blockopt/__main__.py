"""``python -m blockopt ...``: the same as the ``blockopt`` command."""

from .cli import main

raise SystemExit(main())
