"""One exception type for everything a user can get wrong, so the CLI can print it as one line."""


class StylegradError(Exception):
    """A problem with the user's input (a file, a model id, an option), not a bug in stylegrad."""
