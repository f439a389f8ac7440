"""The one exception type users see (its message is a single clear line), and the one warning
luq gives when a slower path serves some work."""

import warnings


class LuqError(Exception):
    """Bad input or an impossible request. The CLI prints `luq: error: <message>` and exits 2."""


class FallbackWarning(RuntimeWarning):
    """A slower (or larger) path serves some work: a kernel refused a shape, a compiled helper did not
    build, an op is missing from this torch. Given once per process for each cause."""


_WARNED: set[tuple[str, str]] = set()   # the causes already warned of in this process


def warn_fallback(what: str, why: str, instead: str) -> None:
    """One warning line per process for each (what, why): `what` is not served as usual because `why`;
    `instead` names the path that serves it."""
    if (what, why) in _WARNED:
        return
    _WARNED.add((what, why))
    warnings.warn(f"luq: {what}: {why}; {instead}", FallbackWarning, stacklevel=3)
