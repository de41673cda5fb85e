"""Where and how training runs: device, precision, seeding and (under ``torchrun``) the process group."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from healthivert.errors import ConfigError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Runtime:
    """The execution context of one training process.

    Attributes:
        device: where tensors live.
        rank: this process's rank (0 when not distributed).
        world_size: number of processes (1 when not distributed).
        autocast_dtype: dtype of mixed-precision autocast, ``None`` for plain float32.
    """

    device: torch.device
    rank: int = 0
    world_size: int = 1
    autocast_dtype: torch.dtype | None = None

    @property
    def distributed(self) -> bool:
        """True when running as one of several ``torchrun`` processes."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the process that logs and writes checkpoints (rank 0)."""
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Mixed-precision context for forward passes (a no-op in float32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A loss scaler, active only for float16 on CUDA (bfloat16 needs none)."""
        enabled = self.device.type == "cuda" and self.autocast_dtype == torch.float16
        return torch.amp.GradScaler(self.device.type, enabled=enabled)


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bfloat16 matrix instructions (AVX512-BF16 or AMX)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def choose_device(requested: Literal["auto", "cpu", "cuda"]) -> torch.device:
    """Resolve ``auto`` to CUDA when available, else CPU; refuse ``cuda`` without a GPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda", "no CUDA device is available", "set device to auto or cpu")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def choose_precision(device: torch.device, requested: Literal["auto", "fp32", "bf16", "fp16"]) -> torch.dtype | None:
    """Autocast dtype for ``requested`` on ``device`` (``None`` = float32).

    ``auto`` picks bfloat16 on a CPU with native bf16 instructions (about 2.6x the float32 FLOP
    rate, see ``benchmarks/bench_training.py``) and on CUDA devices that support it, else float32.
    """
    if requested == "fp32":
        return None
    if requested == "fp16":
        if device.type != "cuda":
            raise ConfigError("precision=fp16", "float16 autocast needs a CUDA device", "use bf16 or fp32 on CPU")
        return torch.float16
    if requested == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else None


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch, and ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def rng_state() -> dict[str, Any]:
    """The random states of python, numpy and torch (CPU and CUDA), for checkpoints."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states saved by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def runtime_for(device: Literal["auto", "cpu", "cuda"], precision: Literal["auto", "fp32", "bf16", "fp16"],
                cpu_threads: int = 0) -> Iterator[Runtime]:
    """Set up the process (joining the ``torchrun`` process group when launched by it) and tear it down.

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the process group uses NCCL on CUDA and
    gloo on CPU; a group that already exists (set up by the caller) is reused and left open.

    Args:
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        precision: autocast choice, see :func:`choose_precision`.
        cpu_threads: intra-op threads (0 keeps torch's default, one per core). On a machine whose
            cores are oversubscribed by other processes, 1 thread was measured 3-4x faster than 2
            (OpenMP threads wait on each other; ``benchmarks/bench_training.py --threads``).
    """
    if cpu_threads > 0:
        torch.set_num_threads(cpu_threads)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dev = choose_device(device)
    created = False
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        created = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    runtime = Runtime(device=dev, rank=rank, world_size=world_size, autocast_dtype=choose_precision(dev, precision))
    log.info("training on %s (rank %d of %d, autocast %s)", dev, rank, world_size, runtime.autocast_dtype)
    try:
        yield runtime
    finally:
        if created:
            dist.destroy_process_group()
