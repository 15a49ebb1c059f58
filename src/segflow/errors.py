"""Typed errors. Each message says what was received and what to do about it."""


class SegflowError(Exception):
    """Base class: the CLI prints the message and exits with code 2, no traceback."""


class ConfigError(SegflowError):
    """A configuration value or file is invalid."""


class InputError(SegflowError):
    """An input location or file cannot be used as given."""


class DatasetError(SegflowError):
    """A dataset does not follow the contract in docs/dataset.md, or conflicts with a request."""


class ModelChangedError(SegflowError):
    """The models a run was planned with were replaced (retrained into the same URL) while
    it ran; its shards would mix two models' masks."""


class PairingError(ConfigError):
    """Images cannot be paired with their masks as asked (a pattern, template or pairs CSV);
    the message shows one example of each side."""
