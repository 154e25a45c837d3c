"""torch.library ops. Importing this package registers them under ``torch.ops.aqcf``."""

from . import attention, conv  # noqa: F401
