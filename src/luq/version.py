"""luq's version, in a leaf module: `luq` re-exports it, and the modules that stamp it into an artifact
import it from here (importing it from `luq` itself would close an import cycle through its lazy names)."""

__version__ = "0.1.0"
