"""Errors users see: one clear message naming the file (or object) and the problem."""


class ExpoError(Exception):
    """An error caused by input or environment, reported to the user without a traceback."""


class InvalidCheckpoint(ExpoError):
    """A checkpoint file or folder is malformed, truncated, unsafe or unsupported."""


class PlanError(ExpoError):
    """The two checkpoints cannot be extrapolated together (lists every difference found)."""


class StorageError(ExpoError):
    """Reading or writing a storage location failed."""


class NotFound(StorageError):
    """The file or object does not exist (every storage backend raises this, never a bare StorageError)."""


class SourceChanged(StorageError):
    """An input file is no longer the version a plan read (its reads would mix two versions)."""


class AlreadyExists(StorageError):
    """A create-if-absent write found the key already there (another run committed it first)."""


class VerifyError(ExpoError):
    """A variant does not match its manifest."""
