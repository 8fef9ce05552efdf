"""The exceptions a user can cause. Each names the offending file, row or model in its message."""


class SpeechLMError(Exception):
    """Base class of every error this project raises on purpose."""


class ManifestError(SpeechLMError):
    """A manifest file or one of its rows is malformed (message names the file and line)."""


class AudioError(SpeechLMError):
    """An audio file is missing, unreadable, empty or at an unexpected sample rate."""


class AlignmentError(SpeechLMError):
    """Speech and text cannot be aligned (e.g. the audio is shorter than its transcript)."""


class ModelError(SpeechLMError):
    """A model folder is missing or does not match what it is loaded against."""


class CheckpointError(SpeechLMError):
    """A checkpoint is corrupt, incomplete or belongs to another model."""


class ConfigError(SpeechLMError):
    """A config file or a key=value override is invalid."""


class FeatureCacheError(SpeechLMError):
    """A feature cache is incomplete, stale, or was built by another encoder (message names the folder)."""
