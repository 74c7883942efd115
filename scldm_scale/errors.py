"""User-facing errors.

Every problem caused by the user's input (a file, a recipe key, a column, a value) is raised
as :class:`ScldmError` with a one-line message that names the offending file/key/field and
says how to fix it. The CLI prints it as ``error: <message>`` and exits with status 2; no
traceback is shown unless ``SCLDM_DEBUG=1``.
"""


class ScldmError(Exception):
    """An input error with a one-line, actionable message."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
