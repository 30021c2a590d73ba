"""The one error type for bad input: a data file, a config key, a missing or damaged artifact.

Its message names the file, line, field or key that is wrong and says how to fix it; the CLI prints it without a
traceback and exits non-zero.
"""


class UserError(Exception):
    pass
