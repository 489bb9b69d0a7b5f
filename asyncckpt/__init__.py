"""asyncckpt: ML training checkpoints that do not stall training.

``save`` blocks only while the state is copied into reused, page-locked staging buffers; the
compression, writing, fsync and atomic publication run in the background. See README.md and
docs/design.md.
"""

from ._checkpoint import Checkpoint as Checkpoint
from ._checkpoint import LoadStatus as LoadStatus
from ._checkpoint import load as load
from ._errors import CheckpointError as CheckpointError
from ._errors import ConcurrentWriterError as ConcurrentWriterError
from ._errors import CorruptCheckpointError as CorruptCheckpointError
from ._errors import IncompleteRestoreError as IncompleteRestoreError
from ._errors import MismatchError as MismatchError
from ._errors import RestoreError as RestoreError
from ._errors import SaveError as SaveError
from ._handles import SaveHandle as SaveHandle
from ._manager import CheckpointManager as CheckpointManager
from ._manager import latest_checkpoint as latest_checkpoint
from ._options import CheckpointOptions as CheckpointOptions
from ._options import SaveMetrics as SaveMetrics
from ._sync import SyncCheckpointManager as SyncCheckpointManager
from ._sync import SyncSaveHandle as SyncSaveHandle

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "CheckpointManager",
    "CheckpointError",
    "CheckpointOptions",
    "ConcurrentWriterError",
    "CorruptCheckpointError",
    "IncompleteRestoreError",
    "LoadStatus",
    "MismatchError",
    "RestoreError",
    "SaveError",
    "SaveHandle",
    "SaveMetrics",
    "SyncCheckpointManager",
    "SyncSaveHandle",
    "latest_checkpoint",
    "load",
]
