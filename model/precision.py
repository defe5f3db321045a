"""Mixed precision: bf16 autocast around a forward where it pays, fp32 weights always.

``mixed_precision`` of the stage configs: ``auto`` (bf16 on a CUDA device, fp32 on the
CPU, where bf16 matmuls are slower on most processors), ``bf16`` (wherever it runs) or
``no``. bf16 keeps fp32's exponent range, so no loss scaling is needed (unlike fp16).
"""

from __future__ import annotations

from typing import Literal

import torch

MixedPrecision = Literal["auto", "bf16", "no"]


def enabled(mixed_precision: MixedPrecision, device: torch.device | str) -> bool:
    """Whether ``mixed_precision`` means bf16 autocast on ``device``."""
    return mixed_precision == "bf16" or (mixed_precision == "auto" and torch.device(device).type == "cuda")


def autocast(mixed_precision: MixedPrecision, device: torch.device | str) -> torch.autocast:
    """``torch.autocast`` in bf16 where :func:`enabled`, a no-op otherwise."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled(mixed_precision, device))
