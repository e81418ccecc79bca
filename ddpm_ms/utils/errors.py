"""Errors the command lines report as one line: bad input (exit code 2), an unwritable output (exit code 4)."""


class UserError(Exception):
    """Bad input (data, config, checkpoint, paths): message says what is wrong and how to fix it."""


class WriteError(OSError):
    """An output file could not be written (disk full, quota, I/O or permission error).

    The message names the file, the reason, the space the write needed and what was free; the
    partial file is already removed and the file's previous version (if any) is untouched. It is
    an OSError, so code that handles OSError keeps working; the CLI exits with code 4.
    """

    def __init__(self, message, errno=None, path=None, needed=None):
        super().__init__(message)
        self.errno, self.filename, self.needed = errno, path, needed

    def __str__(self):  # OSError's own form is "[Errno N] strerror: filename"
        return self.args[0]
