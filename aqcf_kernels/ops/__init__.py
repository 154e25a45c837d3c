"""torch.library ops. Importing this package registers them under ``torch.ops.aqcf``."""

from . import attention, conv, norm  # noqa: F401
