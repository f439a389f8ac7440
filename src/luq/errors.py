"""The one exception type users see: its message is a single clear line."""


class LuqError(Exception):
    """Bad input or an impossible request. The CLI prints `luq: error: <message>` and exits 2."""
