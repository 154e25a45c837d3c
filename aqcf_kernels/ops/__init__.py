"""torch.library ops. Importing this package registers them under ``torch.ops.aqcf``."""

from . import attention, autocast, conv, lowerings, norm, rnn_cell  # noqa: F401

autocast.register()
