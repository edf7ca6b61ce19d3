"""``python -m kivi_ops generate|eval``: see ``kivi_ops.cli``."""

from kivi_ops.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
