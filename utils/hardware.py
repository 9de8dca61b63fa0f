"""What this machine's CPU does natively, and the warning when a precision setting would be emulated.

bf16 autocast on the CPU runs through oneDNN. On a CPU with bf16 units (AVX512-BF16, AMX) a
StealthMark training step ran 1.91x faster at ``bf16-mixed`` than at ``32-true``; on an AVX2-only
CPU (AMD EPYC, no AVX-512) the same step ran 14.7x *slower* (1.11 s -> 16.3 s), because every bf16
operation is emulated (``python benchmarks/stealthmark.py --compare-precision bf16-mixed``,
docs/stealthmark.md section 4). A run asked for bf16 on such a CPU is therefore warned, not refused:
it still trains correctly, only much more slowly.
"""

from __future__ import annotations

import torch


def cpu_capability() -> str:
    """The vector instruction set PyTorch dispatches CPU kernels to (``"AVX2"``, ``"AVX512"``, ...)."""
    return str(torch.backends.cpu.get_cpu_capability())


def cpu_bf16_is_native() -> bool:
    """oneDNN's own answer to "does this CPU support bf16" (True from AVX-512 on; False on AVX2-only
    CPUs, where a ``bf16-mixed`` StealthMark step measured 14.7x slower than ``32-true``)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def emulated_bf16_warning(precision: str, device_type: str, native: bool) -> str | None:
    """The warning for a Lightning ``precision`` on a device, or None when nothing is emulated.

    Args:
        precision: Lightning's precision string (``"32-true"``, ``"bf16-mixed"``, ``"bf16-true"``, ...).
        device_type: ``torch.device.type`` of the training device (``"cpu"``, ``"cuda"``, ...).
        native: :func:`cpu_bf16_is_native` on this machine.
    """
    if device_type != "cpu" or native or not str(precision).startswith("bf16"):
        return None
    return (f"trainer.precision={precision} on a CPU without native bf16 (PyTorch dispatches to "
            f"{cpu_capability()}; no AVX-512/AMX): every bf16 operation is emulated. A StealthMark step "
            "measured 14.7x slower than at 32-true on such a CPU. Use trainer.precision=32-true here, or "
            "measure first: python benchmarks/stealthmark.py --compare-precision bf16-mixed")
