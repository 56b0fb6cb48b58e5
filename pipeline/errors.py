"""The base of every error a user can act on; the CLI prints its message without a traceback."""


class UserError(Exception):
    pass
