"""``python -m signaling_server``: the same as the ``duet-signaling`` command."""

from .cli import main

raise SystemExit(main())
