"""The base of every error that explains itself: rule scripts print its message, not a traceback."""


class EagleflowError(Exception):
    """A problem with the user's inputs or configuration; the message says what to do."""
