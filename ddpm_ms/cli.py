"""Shared entry-point behaviour: user errors are one line on stderr and exit code 2."""

import sys

from .errors import UserError


def run_cli(main, argv=None):
    """Run ``main(argv)``; a UserError prints ``error: <message>`` and exits 2."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
