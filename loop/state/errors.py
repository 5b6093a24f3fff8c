"""The one error type for problems a user can fix; the CLI prints it without a traceback."""


EXIT_USER_ERROR = 2  # the exit status of a process that stopped on one (the CLI, the engine)
USER_ERROR_KEY = "engine.user_error"  # kv: what the engine stopped on, for the daemon to say


class UserError(Exception):
    """Bad input (config, command, data, workspace): the message says what is wrong and what to do."""
