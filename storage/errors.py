"""Domain errors of the storage layer. Database and S3 errors never escape raw."""

from __future__ import annotations


class StorageError(Exception):
    """Base class for storage errors a user or operator can act on."""


class InvalidName(StorageError, ValueError):
    """A namespace, adapter, alias or object key breaks the naming rules."""


class InvalidReference(InvalidName):
    """An adapter reference is not ``ns/name``, ``ns/name:VERSION`` or ``ns/name@ALIAS``."""


class IntegrityError(StorageError):
    """Bytes read back do not have the SHA-256 (or size) recorded when they were written."""


class ObjectNotFound(StorageError, KeyError):
    """No object under that key."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "object not found"


class ObjectExists(StorageError):
    """An object already exists under that key; keys are immutable."""


class ObjectStoreUnavailable(StorageError):
    """The object store cannot be reached or refused the request."""


class CatalogUnavailable(StorageError):
    """The catalog database cannot be reached."""


class CatalogDriverMissing(StorageError):
    """The catalog URL names a database whose Python driver is not installed."""


class SchemaOutOfDate(StorageError):
    """The catalog schema is behind the code: run ``lorafleet db upgrade``."""


class NotFound(StorageError, LookupError):
    """A catalog entity does not exist."""


class AdapterNotFound(NotFound):
    """No such adapter, version or alias."""


class BaseModelNotFound(NotFound):
    """No such registered base model."""


class InUse(StorageError):
    """Something still depends on it (an alias points at the version, a job trains on the
    file): refused, naming what."""


class AdapterExists(StorageError):
    """An adapter version with that identity already exists."""


class AdapterRejected(StorageError, ValueError):
    """An adapter directory is unsafe or does not fit its base (the message says why)."""
