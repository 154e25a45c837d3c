"""torch.library ops. Importing this package registers them under ``torch.ops.aqcf``."""

from . import attention, conv, norm, rnn_cell  # noqa: F401
