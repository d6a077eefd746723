"""Every shim megatron-core needs to run without CUDA, in one place.

megatron-core (and the stock ``megatron.training`` loop) hard-code CUDA in ~200 places: devices,
RNG trackers, streams, events, ``grad.type() == 'torch.cuda.FloatTensor'`` asserts. For tests and
laptops we keep them working on CPU with gloo. ``apply_cpu_shims()`` does nothing when a GPU is
present; ``skip_compile_helpers()`` is needed on GPU too (the wheel ships the helpers prebuilt but
its start-up still runs ``make`` in a folder with no Makefile and exits).

``tests/test_cpu_shims.py`` trains a tiny GPTModel through these shims, so a megatron-core upgrade
that breaks them fails there loudly.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import socket
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False
_MODE: "_CudaToCpuMode | None" = None

# Stock-loop flags for a GPU without Transformer Engine (or apex): the defaults select TE layers and fused
# kernels from TE/apex; these select megatron-core's local spec and plain PyTorch ops. (Not a CPU shim.)
WITHOUT_TE_FLAGS: tuple[str, ...] = (
    "--transformer-impl", "local",
    "--no-rope-fusion",
    "--no-persist-layer-norm",
    "--no-gradient-accumulation-fusion",
    "--no-masked-softmax-fusion",
)
# Stock-loop flags that select CPU-capable code paths (fused kernels need CUDA / apex / TE).
CPU_FLAGS: tuple[str, ...] = (
    "--distributed-backend", "gloo",
    *WITHOUT_TE_FLAGS,
    "--no-bias-swiglu-fusion",
    "--no-bias-dropout-fusion",
)


# ---------------------------------------------------------------------------------------------
# Needed on GPU and CPU alike
# ---------------------------------------------------------------------------------------------
def skip_compile_helpers() -> bool:
    """Make ``compile_helpers`` a no-op when the prebuilt ``helpers_cpp*.so`` ships in the wheel.

    Returns True when neutralised. Without it the stock start-up runs ``make`` and ``sys.exit(1)``.
    """
    import megatron.core.datasets.utils as ds_utils

    folder = Path(ds_utils.__file__).parent
    if not any(folder.glob("helpers_cpp*.so")):
        return False
    if getattr(ds_utils.compile_helpers, "_megatron_prune_noop", False):
        return True

    def compile_helpers() -> None:
        """Prebuilt dataset helpers are present; nothing to compile."""

    compile_helpers._megatron_prune_noop = True  # type: ignore[attr-defined]
    ds_utils.compile_helpers = compile_helpers
    return True


# ---------------------------------------------------------------------------------------------
# CPU only
# ---------------------------------------------------------------------------------------------
def _is_cuda_device(device: Any) -> bool:
    """True for ``'cuda'``, ``'cuda:0'``, ``torch.device('cuda')`` and bare ints (CUDA indices)."""
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Redirect every ``device='cuda'`` to CPU and report CUDA type names from ``Tensor.type()``.

    Kept active for the life of the process (megatron allocates on 'cuda' everywhere, e.g. the
    optimizer, grad buffers and the schedules).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # clip_grads asserts grad.type() == 'torch.cuda.FloatTensor'.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


class _Stream:
    """Stand-in for ``torch.cuda.Stream``: CPU work is synchronous."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.device = torch.device("cpu")

    def wait_stream(self, *args: Any) -> None: ...
    def wait_event(self, *args: Any) -> None: ...
    def synchronize(self) -> None: ...
    def query(self) -> bool:
        return True

    def record_event(self, event: Any = None) -> "_Event":
        return event or _Event()

    def __enter__(self) -> "_Stream":
        return self

    def __exit__(self, *exc: Any) -> None: ...


class _Event:
    """Stand-in for ``torch.cuda.Event``; elapsed_time in ms from wall clock."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._t = 0.0

    def record(self, *args: Any) -> None:
        import time

        self._t = time.perf_counter()

    def wait(self, *args: Any) -> None: ...
    def synchronize(self) -> None: ...
    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "_Event") -> float:
        return (end._t - self._t) * 1000.0


class _DeviceProperties:
    name = "cpu"
    total_memory = 0
    major = 0
    minor = 0
    multi_processor_count = 0


def _patch_torch_cuda() -> None:
    """Device, stream, event and RNG entry points of ``torch.cuda`` that megatron calls."""
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    # device_count 1 makes initialize_megatron set up model-parallel groups and RNG trackers.
    cuda.device_count = lambda: 1
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.Stream = _Stream
    cuda.Event = _Event
    cuda.current_stream = lambda *a, **k: _Stream()
    cuda.default_stream = lambda *a, **k: _Stream()
    cuda.set_stream = lambda *a, **k: None
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.get_device_properties = lambda *a, **k: _DeviceProperties()
    cuda.get_device_name = lambda *a, **k: "cpu"
    cuda.get_device_capability = lambda *a, **k: (0, 0)
    for name in ("memory_allocated", "memory_reserved", "max_memory_allocated",
                 "max_memory_reserved"):
        setattr(cuda, name, lambda *a, **k: 0)
    # The "CUDA" generator is the CPU default generator: on CPU, dropout draws from it.
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None  # torch.manual_seed calls it after seeding the CPU


def _patch_rng_tracker() -> None:
    """Make megatron's CUDA RNG tracker swap CPU generator states (TP-rank dropout stays right)."""
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    @contextlib.contextmanager
    def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"cuda rng state {name} is not added")
        outer_name, outer_state = self._current_state_name, torch.get_rng_state()
        if outer_name != "default-rng":
            self.states_[outer_name] = outer_state
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            if outer_name != "default-rng":
                outer_state = self.states_[outer_name]
            torch.set_rng_state(outer_state)
            self._current_state_name = outer_name

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    mrandom.CudaRNGStatesTracker.fork = fork


def _patch_initialize_megatron() -> None:
    """The stock ``pretrain`` calls ``initialize_megatron()`` which asserts CUDA unless told not to."""
    import megatron.training.initialize as init_mod
    import megatron.training.training as training_mod

    original = init_mod.initialize_megatron

    @functools.wraps(original)
    def initialize_megatron(*args: Any, **kwargs: Any):
        kwargs["allow_no_cuda"] = True
        return original(*args, **kwargs)

    init_mod.initialize_megatron = initialize_megatron
    training_mod.initialize_megatron = initialize_megatron


def _host_split_sizes(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """``maybe_move_tensor_to_cpu`` as on a GPU: the split sizes come back as numpy arrays (which
    ``all_to_all_single`` takes) also when the tensor already lives on the CPU; the stock one leaves a CPU tensor
    as it is, and gloo's ``all_to_all_single`` then refuses tensor split sizes (a TypeError)."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.detach().cpu().numpy()
    return tensor


def _patch_moe_alltoall() -> None:
    """The alltoall MoE token dispatcher (expert parallelism) hands its split sizes over as numpy arrays only
    after a device-to-host copy (megatron-core 0.19.2): give the CPU the same."""
    try:
        from megatron.core.transformer.moe import moe_utils, token_dispatcher
    except ImportError:  # a megatron-core without MoE modules
        return
    moe_utils.maybe_move_tensor_to_cpu = _host_split_sizes
    token_dispatcher.maybe_move_tensor_to_cpu = _host_split_sizes


def apply_cpu_shims() -> bool:
    """Install every CPU shim (idempotent). Returns False, doing nothing, when CUDA is available."""
    global _APPLIED, _MODE
    skip_compile_helpers()
    if _APPLIED:
        return True
    if torch.cuda.is_available():
        return False
    _patch_torch_cuda()
    _patch_rng_tracker()
    _patch_moe_alltoall()
    try:
        _patch_initialize_megatron()
    except ImportError:  # megatron.training absent: megatron-core alone still works
        pass
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
    _APPLIED = True
    return True


def shims_active() -> bool:
    """Whether ``apply_cpu_shims`` installed the CPU shims in this process."""
    return _APPLIED


# ---------------------------------------------------------------------------------------------
# Process groups for tests and tools
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_parallel(tp: int = 1, pp: int = 1, seed: int = 1234, ep: int = 1) -> None:
    """Init torch.distributed (torchrun env or a single process) and megatron's TP/PP (and expert-parallel) groups.

    Uses gloo on CPU (after applying the shims) and nccl on GPU; seeds megatron's RNG trackers.
    Idempotent for the same (tp, pp).
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    on_cpu = apply_cpu_shims() or shims_active()
    if not torch.distributed.is_initialized():
        if "RANK" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if not on_cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(
            backend="gloo" if on_cpu else "nccl", timeout=datetime.timedelta(minutes=5)
        )
    world = torch.distributed.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by tp*pp = {tp}*{pp}")
    if parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_world_size(),
                parallel_state.get_expert_model_parallel_world_size()) == (tp, pp, ep):
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tp, pp, expert_model_parallel_size=ep)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
