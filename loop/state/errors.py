"""The one error type for problems a user can fix; the CLI prints it without a traceback."""


class UserError(Exception):
    """Bad input (config, command, data, workspace): the message says what is wrong and what to do."""
