"""User-facing errors: the CLI prints these as one line and exits non-zero, no traceback."""


class UserError(Exception):
    """A mistake in what the user gave us (flags, files, checkpoints, shapes).

    `code` is the exit status: 2 for usage errors, 1 for runtime problems.
    """

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code
