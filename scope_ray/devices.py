"""Which device a piece of work runs on: the GPU Ray granted it, or the CPU — never a GPU Ray did
not reserve, and never a silent fallback to the CPU from a GPU that was granted but cannot be used.

No Ray import here: callers pass what Ray granted (``ray.get_gpu_ids()``), so the rule is tested
without a GPU. ``cuda_problem`` says why torch cannot use the GPUs it sees (no CUDA runtime for the
driver, a compute capability the wheel has no kernels for); ``doctor`` prints the same facts.
"""

from __future__ import annotations


class GPUUnusable(RuntimeError):
    """Ray granted this process a GPU that torch cannot use (driver, wheel or architecture)."""


def wheel_facts() -> str:
    """torch's version, the CUDA it was built for and the GPU architectures it has kernels for."""
    import torch

    archs = torch.cuda.get_arch_list() if torch.version.cuda else []
    return (f"torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none (CPU-only build)'}, "
            f"kernels for {', '.join(archs) or 'no GPU architecture'}")


def _supported(capability: tuple[int, int], archs: list[str]) -> bool:
    """Whether a GPU of ``capability`` runs a wheel with ``archs`` (``sm_XY`` cubins run on XY and
    later minors of the same major; ``compute_XY`` PTX is JIT-compiled for XY and anything newer)."""
    major, minor = capability
    for arch in archs:
        kind, _, num = arch.partition("_")
        if not num.isdigit():
            continue
        a_major, a_minor = int(num[:-1]), int(num[-1])
        if kind == "sm" and a_major == major and a_minor <= minor:
            return True
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return True
    return False


def cuda_problem() -> str | None:
    """None when torch can run on every GPU it sees; otherwise what is wrong, with the facts."""
    import torch

    if not torch.cuda.is_available():
        if not torch.version.cuda:
            return f"this torch has no CUDA support ({wheel_facts()})"
        return (f"torch cannot initialise CUDA: no GPU visible, or the NVIDIA driver is older than CUDA "
                f"{torch.version.cuda} needs ({wheel_facts()})")
    try:
        archs = torch.cuda.get_arch_list()
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            if archs and not _supported(cap, archs):
                return (f"GPU {i} ({torch.cuda.get_device_name(i)}) has compute capability {cap[0]}.{cap[1]}, "
                        f"which this wheel has no kernels for ({wheel_facts()})")
    except Exception as exc:  # noqa: BLE001 - whatever CUDA says is the answer
        return f"CUDA failed while querying the GPUs: {type(exc).__name__}: {exc} ({wheel_facts()})"
    return None


def device_for(granted_gpu_ids: list, problem: str | None) -> str:
    """The device for work that Ray granted ``granted_gpu_ids`` (empty: no GPU), given
    ``cuda_problem()``'s answer. Ray restricts CUDA_VISIBLE_DEVICES to the granted GPUs, so
    "cuda" is that GPU."""
    if not granted_gpu_ids:
        return "cpu"
    if problem is not None:
        raise GPUUnusable(f"Ray granted GPU(s) {list(granted_gpu_ids)} to this process but torch cannot use them: "
                          f"{problem}. Install a torch build for this driver and GPU, or set the ray GPU settings to 0 "
                          "to run on CPUs")
    return "cuda"


def granted_device() -> str:
    """``device_for`` of the calling Ray actor or task (the driver, granted nothing: "cpu")."""
    import ray

    ids = ray.get_gpu_ids() if ray.is_initialized() else []
    return device_for(ids, cuda_problem() if ids else None)
