"""Shared entry-point behaviour: errors are one line on stderr (``error: ...``) and an exit code.

Exit codes: 0 done; 2 bad input (config, data, checkpoint, paths, an output directory in use
or already holding a run: nothing was written); 3 training diverged (the loss stayed NaN/inf);
4 an output could not be written (a full disk, a quota, an I/O error: the line names the file
and the space it needed; partial files are removed, earlier checkpoints are intact, a training
run continues with --resume); 130 interrupted.
"""

import sys

from ddpm_ms.utils.errors import UserError, WriteError

EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_WRITE_FAILED, EXIT_INTERRUPTED = 2, 3, 4, 130


def run_cli(main, argv=None):
    """Run ``main(argv)``; a UserError prints ``error: <message>`` and exits 2 (see the module doc)."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_WRITE_FAILED)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_DIVERGED)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
