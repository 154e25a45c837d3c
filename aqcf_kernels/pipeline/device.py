"""The ``--device`` argument every pipeline command takes: ``auto`` | ``cpu`` | ``cuda[:N]``."""

from __future__ import annotations

import torch

DEVICE_CHOICES_HELP = "auto (CUDA when present, else CPU), cpu, cuda or cuda:N"


class DeviceError(ValueError):
    """A requested device this machine or this torch build cannot provide (one line, no traceback)."""


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu``; anything else is checked, not trusted.

    Raises :class:`DeviceError` with one line naming the cause: a CPU-only torch build, no visible
    GPU, an index past the device count, or a string torch does not parse.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec.strip() if isinstance(spec, str) else spec)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"--device {spec!r} is not a device ({DEVICE_CHOICES_HELP})") from e
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceError(f"--device {spec!r}: only {DEVICE_CHOICES_HELP} are supported")
    if torch.version.cuda is None:
        raise DeviceError(
            f"--device {spec!r}: this torch ({torch.__version__}) is a CPU-only build; "
            "use --device cpu, or install a CUDA build of torch"
        )
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {spec!r}: no CUDA GPU is visible (CUDA_VISIBLE_DEVICES, driver)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device
