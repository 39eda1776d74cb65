"""The project's error hierarchy.

Every error a user can cause derives from :class:`PipemedicError`, so the CLI can turn it into
one clear line and a non-zero exit instead of a traceback.
"""

from __future__ import annotations


class PipemedicError(Exception):
    """Base class of every error Pipeline Medic raises on purpose."""


class ConfigError(PipemedicError):
    """A configuration file or option is invalid."""


class ScenarioError(ConfigError):
    """A scenario file is invalid; the message names the file, the key and the allowed values."""


class CheckpointError(PipemedicError):
    """A policy checkpoint is missing, corrupt or of the wrong kind."""


class StorageError(PipemedicError):
    """A table or object store could not be read or written."""
