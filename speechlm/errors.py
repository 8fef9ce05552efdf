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


class NonFiniteError(SpeechLMError):
    """Training produced non-finite losses, gradients or weights (message names the step and the batch)."""


class BatchMemoryError(SpeechLMError):
    """A training batch did not fit in memory (message names its size, its rows and the config keys bounding it)."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (e.g. a full disk); the previous complete checkpoint is left as it was."""


class RankError(SpeechLMError):
    """Another rank failed; raised on every other rank too, so that none waits forever for the failed one."""


class Preempted(SpeechLMError):
    """Training stopped on SIGTERM/SIGUSR1 after checkpointing its last finished step; run it again to resume.

    Recipes exit with :data:`EXIT_PREEMPTED` (75, ``EX_TEMPFAIL`` of sysexits.h: try again later).
    """

    def __init__(self, message: str, step: int, signal_name: str):
        super().__init__(message)
        self.step = step
        self.signal_name = signal_name


#: Exit status of a training recipe stopped by SIGTERM/SIGUSR1 after saving a checkpoint (EX_TEMPFAIL).
EXIT_PREEMPTED = 75
