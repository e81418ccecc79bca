"""What the command tests share: a command run that must fail with one `error:` line and exit code 2."""

import pytest

from ddpm_ms.command_line import run_cli


def one_line_error(main, argv, capsys):
    """Run ``main(argv)`` as the console scripts do; assert exit 2 and a single ``error: ...`` line on stderr;
    return that line."""
    with pytest.raises(SystemExit) as exc:
        run_cli(main, argv)
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]
