"""bnorm_ext: fast, faithful BatchNorm kernels for PyTorch.

`bnorm_ext.BatchNorm2d` is a drop-in for `torch.nn.BatchNorm2d`; the kernels
are reached through the dispatcher as `torch.ops.bnorm_ext.*`.
"""

import re

import torch

# The oldest torch the extension builds and runs against (setup.py and
# pyproject.toml say the same); tested up to torch 2.15.
MIN_TORCH = (2, 11)


def _torch_release(version: str) -> tuple:
    """(major, minor) of a torch version string such as '2.11.0+cu130' or '2.15.0a0+git1234'."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


if _torch_release(torch.__version__) < MIN_TORCH:
    raise ImportError(f"bnorm_ext needs torch>={MIN_TORCH[0]}.{MIN_TORCH[1]}, found torch {torch.__version__}")

from . import _C  # noqa: E402, F401  (registers the ops and their kernels)
from . import _fake  # noqa: E402, F401  (fake kernels for torch.compile / FakeTensor)
from . import _inductor_decomp, _onnx, conv_bn_fusion  # noqa: E402
from .functional import BatchNormFunction, batch_norm  # noqa: E402
from .activation import BatchNormAct2d, batch_norm_act  # noqa: E402
from .fx_activation_fusion import fuse_activations  # noqa: E402
from .modules import (  # noqa: E402
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    convert_batchnorm,
    revert_batchnorm,
)
from .conv_bn_fusion import fuse_conv_bn  # noqa: E402
from .sync_batchnorm import SyncBatchNorm  # noqa: E402

_onnx.register()
conv_bn_fusion.register()
_inductor_decomp.register_when_inductor_loads()

__version__ = "0.1.0"

__all__ = [
    "BatchNormAct2d",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormFunction",
    "SyncBatchNorm",
    "batch_norm",
    "batch_norm_act",
    "build_info",
    "convert_batchnorm",
    "enable_inductor_fusion",
    "fuse_activations",
    "fuse_conv_bn",
    "revert_batchnorm",
]


def build_info() -> dict:
    """How the extension was built: torch version, CUDA kernels and their archs,
    and the CPU kernel build this process dispatches to (cpu_isa: avx512, avx2
    or default)."""
    info = {"bnorm_ext": __version__, "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    info.update(_C.build_info())
    return info


def enable_inductor_fusion(enabled: bool = True) -> None:
    """Makes torch.compile's Inductor fuse bnorm_ext BatchNorm -> relu /
    leaky_relu / silu and BatchNorm -> add -> activation into the fused
    BatchNorm + activation ops (forward and backward), by adding a pre-grad
    pass to torch._inductor.config.pre_grad_custom_pass after the passes
    already there; enabled=False removes it. Graphs without bnorm_ext ops are
    left unchanged."""
    from . import _inductor_activation_fusion  # NB: imports torch._inductor, so only when asked

    _inductor_activation_fusion.enable_inductor_fusion(enabled)
