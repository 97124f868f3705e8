"""Named exceptions. Each message says what value was given, what was expected, and where."""


class EmbedcacheError(Exception):
    """Base class: the CLI turns these into a one-line message and exit code 2."""


class InputError(EmbedcacheError):
    """A problem with an input file or one of its records."""


class AlphabetError(InputError):
    """A sequence holds a character its encoder does not accept."""


class EncoderError(EmbedcacheError):
    """An unknown encoder, a model that cannot be loaded, or an option the encoder does not support."""


class StoreError(EmbedcacheError):
    """A store that is missing, malformed or incomplete."""


class FingerprintMismatch(StoreError):
    """A build into (or a read against) a store made with other settings."""


class SpoolError(StoreError):
    """A build's spool (embedcache.spool) that cannot be read back as it was written."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during a build, saying what was kept: the CLI prints its message."""
