"""torch.library ops. Importing this package registers them under ``torch.ops.aqcf``."""

from . import conv  # noqa: F401
