"""Accelerators by name, and compile-only devices for them: the real TPU and GPU compilers with no device present.

A `Target` is a machine a run will use (v5p-8, 1xH100-80GB, ...): its device count, memory per device and the
published figures a roofline needs (dense bf16 peak, HBM bandwidth, interconnect bandwidth per device).
`compile_devices(target)` gives devices to lower and compile for:
- TPU: libtpu's topology API (`jax.experimental.topologies.get_topology_desc(topology_name="v5p:2x2x1")`),
  which compiles for the chip with the TPU compiler, Pallas kernels lowered by Mosaic.
- NVIDIA: the CUDA PJRT plugin's compile-only topology, given a GpuTargetConfigProto (text form) that
  `gpu_target_config` writes from the device's published figures (SM count, clocks, memory, bandwidth, shared
  memory, compute capability, cuDNN version). No GPU, driver or NVIDIA library is needed to compile; what the
  compiler cannot do without a device (autotuning, building cuDNN's graph) is listed in launch/README.md.
Both come from optional packages (`launch/install.sh --plan`: libtpu and the CUDA plugin of jax's own version),
installed beside the environment (`compilers_dir()`) so that ordinary processes never load them;
`compiler_env()` is the environment of a process that may.

Figures: vendors' data sheets (NVIDIA A100 / H100 / H200 / B200 SXM; Google Cloud TPU v5e / v5p / v6e system
architecture pages). Memory per device for GPUs is what nvidia-smi reports as memory.total.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
import sys

GiB = 2**30
MiB = 2**20


@dataclasses.dataclass(frozen=True)
class Gpu:
    """What a GpuTargetConfigProto needs of an NVIDIA GPU (per SM unless named otherwise)."""
    description: str  # the device kind the CUDA driver reports
    compute_capability: tuple[int, int]
    sm_count: int
    clock_ghz: float  # boost clock
    l2_bytes: int
    shared_memory_per_sm: int
    shared_memory_per_block_optin: int
    fp32_cores_per_sm: int = 128
    registers_per_sm: int = 65536
    threads_per_sm: int = 2048


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str  # tpu | gpu
    devices: int  # JAX devices (a v5p chip is one device: its two TensorCores run as one megacore)
    memory_bytes: int  # per device
    peak_flops: float  # dense bf16 FLOP/s per device
    hbm_bytes_per_s: float  # per device
    link_bytes_per_s: float  # interconnect bandwidth per device, one direction (ICI or NVLink)
    topology: str = ""  # TPU: libtpu's topology name; GPU: "slices x hosts x devices per host"
    gpu: Gpu | None = None


_A100 = Gpu("NVIDIA A100-SXM4-80GB", (8, 0), 108, 1.41, 40 * MiB, 164 * 1024, 163 * 1024, fp32_cores_per_sm=64)
_H100 = Gpu("NVIDIA H100 80GB HBM3", (9, 0), 132, 1.98, 50 * MiB, 228 * 1024, 227 * 1024)
_H200 = dataclasses.replace(_H100, description="NVIDIA H200")
_B200 = Gpu("NVIDIA B200", (10, 0), 148, 1.965, 126 * MiB, 228 * 1024, 227 * 1024)

# nvidia-smi memory.total: A100 80GB 81,920 MiB; H100 SXM 80GB 81,559 MiB; H200 143,771 MiB; B200 183,359 MiB.
H100_80GB_BYTES = 81559 * MiB
_GPU_MEMORY = {"A100-80GB": 81920 * MiB, "H100-80GB": H100_80GB_BYTES, "H200": 143771 * MiB, "B200": 183359 * MiB}
# (Gpu, dense bf16 FLOP/s, HBM B/s, NVLink B/s per direction)
_GPUS = {"A100-80GB": (_A100, 312e12, 2.039e12, 300e9), "H100-80GB": (_H100, 989e12, 3.35e12, 450e9),
         "H200": (_H200, 989e12, 4.8e12, 450e9), "B200": (_B200, 2250e12, 8.0e12, 900e9)}
# TPU chips (libtpu's names): (HBM bytes, dense bf16 FLOP/s, HBM B/s, ICI B/s per chip one direction, TensorCores
# per chip in the slice name): v5p counts TensorCores (v5p-8 = 4 chips); v5e and v6e count chips.
_TPUS = {"v5p": (95 * GiB, 459e12, 2.765e12, 4800e9 / 8 / 2, 2), "v5e": (16 * GiB, 197e12, 819e9, 1600e9 / 8 / 2, 1),
         "v6e": (32 * GiB, 918e12, 1640e9, 3584e9 / 8 / 2, 1)}
# chips -> libtpu topology per generation (3-D torus for v5p, 2-D for v5e/v6e)
_TOPOLOGIES_3D = {1: "1x1x1", 4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8"}
_TOPOLOGIES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


def _tpu(name: str) -> Target:
    chip, count = name.split("-")
    memory, flops, hbm, ici, cores_per_chip = _TPUS[chip]
    chips = int(count) // cores_per_chip
    table = _TOPOLOGIES_3D if chip == "v5p" else _TOPOLOGIES_2D
    if chips not in table:
        raise KeyError(name)
    return Target(name, "tpu", chips, memory, flops, hbm, ici, f"{chip}:{table[chips]}")


_GPU_COUNTS = (1, 2, 4, 8)


def _gpu(name: str) -> Target:
    count, kind = name.split("x", 1)
    spec, flops, hbm, nvlink = _GPUS[kind]
    if int(count) not in _GPU_COUNTS:  # one host's GPUs, NVLink-connected
        raise KeyError(name)
    return Target(name, "gpu", int(count), _GPU_MEMORY[kind], flops, hbm, nvlink, f"1x1x{int(count)}", spec)


# v4 is not offered: libtpu's compile-only v4 topology makes each TensorCore a device (8 on v4:2x2x1), while a v4
# VM runs its chips as megacores (4 devices), so its plans would not be the program a v4 runs.
NAMES = ([f"v5p-{n}" for n in (8, 16, 32, 64, 128, 256)]
         + [f"{c}-{n}" for c in ("v5e", "v6e") for n in (1, 4, 8, 16, 32, 64, 128, 256)]
         + [f"{n}x{k}" for k in _GPUS for n in _GPU_COUNTS])


def get(name: str) -> Target:
    """The target named `name` (see NAMES: v5p-8, v5e-16, v6e-8, 1xH100-80GB, 8xH200, ...)."""
    try:
        return _tpu(name) if name[:1] == "v" else _gpu(name)
    except (KeyError, ValueError):
        raise KeyError(f"unknown hardware {name!r}; known: {', '.join(NAMES)}") from None


# --------------------------------------------------------------------------------------------------------
# The compilers
# --------------------------------------------------------------------------------------------------------

def compilers_dir() -> str:
    """Where `launch/install.sh --plan` puts libtpu and the CUDA plugin (MFT_JAX_COMPILERS overrides)."""
    return os.environ.get("MFT_JAX_COMPILERS", os.path.join(sys.prefix, "mft-jax-compilers"))


def compiler_env(env: dict | None = None) -> dict:
    """An environment whose Python finds the planning compilers; JAX itself runs on CPU (no device is used)."""
    # ALLOW_MULTIPLE_LIBTPU_LOAD: libtpu otherwise takes a machine-wide lock meant for a TPU's single owner,
    # and a second compiling process (a second plan, a test) fails on it
    env = dict(os.environ if env is None else env, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    if os.path.isdir(compilers_dir()):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (compilers_dir(), env.get("PYTHONPATH")) if p)
    return env


def _installed(module: str) -> bool:
    """In this process's environment, or in the planning compilers' folder."""
    try:
        if importlib.util.find_spec(module):
            return True
    except ModuleNotFoundError:  # a dotted name whose parent package is absent
        pass
    return os.path.isdir(os.path.join(compilers_dir(), *module.split(".")))


def compiler_available(platform: str) -> bool:
    """Whether the real compiler of `platform` (tpu: libtpu; gpu: jax's CUDA 12 PJRT plugin) is installed."""
    if platform == "tpu":
        return _installed("libtpu")
    return _installed("jax_plugins.xla_cuda12") and _installed("jax_cuda12_plugin")


def compiler_name(platform: str) -> str:
    """The compiler of `platform` with the package that brings it, for the plans to name."""
    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "?"
    if platform == "tpu":
        return f"TPU (libtpu {version('libtpu')})"
    if platform == "gpu":
        return f"CUDA (XLA GPU, jax-cuda12-plugin {version('jax-cuda12-plugin')})"
    return f"CPU (jaxlib {version('jaxlib')})"


def missing_compiler_message(platform: str) -> str:
    package = "libtpu" if platform == "tpu" else "jax-cuda12-plugin and jax-cuda12-pjrt"
    return (f"the {platform.upper()} compiler is not installed ({package} of jax's version); "
            f"run `bash launch/install.sh --plan`")


def gpu_target_config(gpu: Gpu, memory_bytes: int, hbm_bytes_per_s: float, cudnn: tuple[int, int, int]) -> str:
    """A GpuTargetConfigProto in text form for the CUDA compiler, written from the device's figures."""
    major, minor = gpu.compute_capability
    return "\n".join([
        "gpu_device_info {",
        "  threads_per_block_limit: 1024", "  threads_per_warp: 32", "  shared_memory_per_block: 49152",
        f"  shared_memory_per_core: {gpu.shared_memory_per_sm}", f"  threads_per_core_limit: {gpu.threads_per_sm}",
        f"  core_count: {gpu.sm_count}", f"  fpus_per_core: {gpu.fp32_cores_per_sm}",
        "  block_dim_limit_x: 2147483647", "  block_dim_limit_y: 65535", "  block_dim_limit_z: 65535",
        f"  memory_bandwidth: {int(hbm_bytes_per_s)}", f"  l2_cache_size: {gpu.l2_bytes}",
        f"  clock_rate_ghz: {gpu.clock_ghz}", f"  device_memory_size: {memory_bytes}",
        f"  shared_memory_per_block_optin: {gpu.shared_memory_per_block_optin}",
        f"  cuda_compute_capability {{ major: {major} minor: {minor} }}",
        f"  registers_per_core_limit: {gpu.registers_per_sm}", "  registers_per_block_limit: 65536",
        "}",
        'platform_name: "CUDA"',
        f"dnn_version_info {{ major: {cudnn[0]} minor: {cudnn[1]} patch: {cudnn[2]} }}",
        f'device_description_str: "{gpu.description}"',
    ])


# The cuDNN a CUDA 12 jaxlib of 0.10 is built against (what `jax[cuda12]` installs): the version the compiler
# assumes when it chooses cuDNN fusions and flash-attention support.
CUDNN_VERSION = (9, 8, 0)


def compile_devices(target: Target) -> list:
    """Compile-only devices of `target` (see the module docstring); raises RuntimeError naming the fix when
    its compiler is not installed in this process."""
    from jax.experimental import topologies

    if not compiler_available(target.platform):
        raise RuntimeError(missing_compiler_message(target.platform))
    if target.platform == "tpu":
        return list(topologies.get_topology_desc(topology_name=target.topology, platform="tpu").devices)
    config = gpu_target_config(target.gpu, target.memory_bytes, target.hbm_bytes_per_s, CUDNN_VERSION)
    return list(topologies.get_topology_desc(topology_name=target.name, platform="cuda", topology=target.topology,
                                             target_config=config).devices)


def deviceless_cudnn(device):
    """A context in which jax's trace-time cuDNN checks (the installed cuDNN's version, the local GPU's compute
    capability) answer for the compile-only `device` instead of the host, which has neither."""
    from unittest import mock

    from jax._src.cudnn import fused_attention_stablehlo as fused

    version = CUDNN_VERSION[0] * 10000 + CUDNN_VERSION[1] * 100 + CUDNN_VERSION[2]
    capability = tuple(int(x) for x in device.compute_capability.split("."))
    at_least = lambda wanted: capability >= tuple(int(x) for x in wanted.split("."))  # noqa: E731
    return mock.patch.multiple(fused, check_cudnn_version=lambda: version, check_compute_capability=at_least)
