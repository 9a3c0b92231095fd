"""The first run on a GPU machine, in one command (about 10 minutes on one GPU):

    .venv/bin/python bench/gpu_smoke.py                 # every section the machine allows
    .venv/bin/python bench/gpu_smoke.py --skip demo     # without the end-to-end demo on the GPU

Each section prints its figures, or "skipped: why"; a check that fails prints FAIL and the script
exits 1. On a machine without a usable GPU it says so, runs the sections that need none
(environment, placement of a 0-GPU task, checkpoint portability) and exits 0: CI runs it that way
(tests/test_gpu_smoke.py).

Sections:
- env: torch / CUDA build / kernel architectures, the driver (nvidia-smi), the GPUs torch sees
  and whether it can use them (scope_ray.devices), and the GPUs a local Ray advertises.
- placement: a 0-GPU Ray task runs on the CPU; a 1-GPU task on the GPU Ray granted it.
- checkpoint: a train-sae checkpoint written from a GPU SAE (Adam state on the GPU) is read by a
  process that sees no GPU (CUDA_VISIBLE_DEVICES=""), as a GPU-less head does.
- throughput: images/s of deit3-s and clip-vit-b16 (random init, designated layer) in fp32,
  TF32 and bf16 autocast.
- agreement: the designated layer's tokens on the CPU and the GPU (fp32) for the same pixels.
- sae: BatchTopK SAE training steps/s at q = 24,576 (d = 768, K = 30, batch 4096).
- cds-memory: peak GPU memory to encode one CDS batch to codes at q = 49,152 (d = 1,536).
- ddp: two NCCL ranks through train-sae's step, one with an empty batch (needs 2 GPUs).
- demo: `scope-ray demo` end to end with the GPU, its stage times against the CPU figures in
  README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

FAILED: list[str] = []
SECTIONS = ("env", "placement", "checkpoint", "throughput", "agreement", "sae", "cds-memory", "ddp", "demo")


def say(section: str, text: str) -> None:
    print(f"[{section}] {text}", flush=True)


def fail(section: str, text: str) -> None:
    FAILED.append(section)
    say(section, f"FAIL {text}")


def usable_gpus() -> int:
    from scope_ray.devices import cuda_problem

    return torch.cuda.device_count() if torch.cuda.is_available() and cuda_problem() is None else 0


# ------------------------------------------------------------------------------------- sections
def env() -> None:
    from scope_ray.devices import cuda_problem, wheel_facts

    say("env", wheel_facts())
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60).stdout.strip()
        say("env", f"nvidia-smi: {out or '(no output)'}")
    else:
        say("env", "nvidia-smi: not found")
    problem = cuda_problem()
    seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
    say("env", f"torch sees {seen} GPU(s)" + (f"; usable: no ({problem})" if problem else "; usable: yes"))
    import ray

    ray_gpus = ray.cluster_resources().get("GPU", 0.0)
    say("env", f"Ray advertises {ray_gpus:g} GPU(s), torch can use {usable_gpus()}")
    if seen and not problem and ray_gpus != seen:
        fail("env", f"Ray advertises {ray_gpus:g} GPUs but torch sees {seen}")


def placement() -> None:
    import ray

    from scope_ray.devices import granted_device

    cpu = ray.get(ray.remote(num_gpus=0)(granted_device).remote(), timeout=120)
    say("placement", f"0-GPU task -> {cpu}")
    if cpu != "cpu":
        fail("placement", "a task granted no GPU did not run on the CPU")
    if not usable_gpus():
        say("placement", "1-GPU task: skipped (no usable GPU)")
        return

    def where() -> dict:
        return {"device": granted_device(), "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
                "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}

    got = ray.get(ray.remote(num_gpus=1)(where).remote(), timeout=120)
    say("placement", f"1-GPU task -> {got}")
    if got["device"] != "cuda" or not got["gpu_ids"]:
        fail("placement", "a task granted a GPU did not run on it")


def checkpoint(work: Path) -> None:
    from scope_ray.sae import BatchTopKSAE
    from scope_ray.stages.train_sae import _save_checkpoint

    device = "cuda" if usable_gpus() else "cpu"
    torch.manual_seed(0)
    sae = BatchTopKSAE(64, 512, 8, k_aux=32, dead_after_tokens=256).to(device).train()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    for _ in range(3):
        sae.training_step(torch.randn(256, 64, device=device), opt)
    ckpt = work / "checkpoint"
    ckpt.mkdir()
    _save_checkpoint(str(ckpt), sae, opt, 3, 0, [], [], [])
    # What the GPU-less head does at the end of train-sae, in a process that sees no GPU.
    reader = (
        "import sys, torch\n"
        "from scope_ray.sae import BatchTopKSAE\n"
        "from scope_ray.stages import train_sae as t\n"
        "assert not torch.cuda.is_available()\n"
        "s = BatchTopKSAE(64, 512, 8, k_aux=32, dead_after_tokens=256)\n"
        "o = torch.optim.Adam(s.parameters(), lr=1e-3)\n"
        "step, *_ = t._load_checkpoint(sys.argv[1], s, o)\n"
        "print(step, float(s.W_dec.sum()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", reader, str(ckpt)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    if proc.returncode != 0:
        fail("checkpoint", f"a process without a GPU could not read a checkpoint written on {device}: "
                           f"{proc.stderr.strip().splitlines()[-1:]}")
        return
    step, total = proc.stdout.split()
    ok = int(step) == 3 and abs(float(total) - float(sae.W_dec.detach().sum())) < 1e-3
    (say if ok else fail)("checkpoint", f"written on {device}, read with CUDA hidden: step {step}, "
                                        f"W_dec sum {float(total):.5f} vs {float(sae.W_dec.detach().sum()):.5f}")


def _images_per_s(model, pixels, mode: str, repeats: int = 5) -> float:
    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
    torch.backends.cudnn.allow_tf32 = mode == "tf32"
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if mode == "bf16" else torch.autocast("cuda", enabled=False)
    with torch.inference_mode(), ctx:
        model.forward_layer(pixels)  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(repeats):
            model.forward_layer(pixels)
        torch.cuda.synchronize()
    return repeats * len(pixels) / (time.perf_counter() - t)


def throughput() -> None:
    from scope_ray.models import build_model

    if not usable_gpus():
        say("throughput", "skipped (no usable GPU)")
        return
    for name in ("deit3-s", "clip-vit-b16"):
        model = build_model(name).cuda().eval()
        size = model.spec.image_size
        pixels = torch.randn(128, 3, size, size, device="cuda")
        rates = {mode: _images_per_s(model, pixels, mode) for mode in ("fp32", "tf32", "bf16")}
        say("throughput", f"{name} batch 128: " + ", ".join(f"{m} {r:.0f} img/s" for m, r in rates.items())
            + f" (bf16 / fp32 = {rates['bf16'] / rates['fp32']:.2f}x)")
        del model
        torch.cuda.empty_cache()
    torch.backends.cuda.matmul.allow_tf32 = False


def agreement() -> None:
    from scope_ray.models import build_model

    if not usable_gpus():
        say("agreement", "skipped (no usable GPU)")
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    model = build_model("clip-vit-b16").eval()
    pixels = torch.randn(8, 3, 224, 224)
    with torch.inference_mode():
        cpu = model.forward_layer(pixels).patch_tokens
        gpu = model.cuda().forward_layer(pixels.cuda()).patch_tokens.cpu()
    err = float((cpu - gpu).norm() / cpu.norm())
    (say if err < 1e-4 else fail)("agreement", f"clip-vit-b16 layer {model.layer} tokens, CPU vs GPU fp32: "
                                               f"relative error {err:.2e} (limit 1e-4)")


def sae_steps() -> None:
    from scope_ray.sae import BatchTopKSAE

    if not usable_gpus():
        say("sae", "skipped (no usable GPU)")
        return
    torch.manual_seed(0)
    sae = BatchTopKSAE(768, 24_576, 30).cuda().train()
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4)
    x = torch.randn(4096, 768, device="cuda")
    for _ in range(3):
        sae.training_step(x, opt)
    torch.cuda.synchronize()
    t, n = time.perf_counter(), 20
    for _ in range(n):
        sae.training_step(x, opt)
    torch.cuda.synchronize()
    rate = n / (time.perf_counter() - t)
    say("sae", f"q 24,576, d 768, K 30, batch 4096: {rate:.1f} steps/s = {rate * 4096 / 1e6:.2f} M tokens/s, "
               f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def cds_memory() -> None:
    from scope_ray.sae import BatchTopKSAE

    if not usable_gpus():
        say("cds-memory", "skipped (no usable GPU)")
        return
    torch.cuda.reset_peak_memory_stats()
    sae = BatchTopKSAE(1536, 49_152, 30).cuda().eval()
    sae.threshold.fill_(0.1)
    tokens = torch.randn(16 * 256, 1536, device="cuda")  # a CDS batch: 16 images x 256 patches
    with torch.inference_mode():
        sae.encode(tokens)
    torch.cuda.synchronize()
    say("cds-memory", f"q 49,152 codes for 16 images x 256 tokens: peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


def _ddp_rank(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from scope_ray.sae import BatchTopKSAE
    from scope_ray.stages.train_sae import _LossModule, make_stats_reducer, train_step

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)
    sae = BatchTopKSAE(768, 24_576, 30).cuda().train()
    sae.stats_reducer = make_stats_reducer(dist)
    module = DistributedDataParallel(_LossModule(sae, 1 / 32), device_ids=[rank], broadcast_buffers=False)
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4)
    for step in range(6):
        x = torch.randn(2048, 768, device="cuda")
        train_step(module, sae, opt, x[:0] if (rank == 1 and step == 2) else x)
    torch.cuda.synchronize()
    Path(out, f"rank{rank}").write_text(json.dumps({"seen": int(sae.num_tokens_seen), "w": float(sae.W_dec.sum())}))
    dist.destroy_process_group()


def ddp(work: Path) -> None:
    import multiprocessing

    if usable_gpus() < 2:
        say("ddp", f"skipped (needs 2 usable GPUs, has {usable_gpus()})")
        return
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_ddp_rank, args=(r, str(work / "store"), str(work))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        if p.is_alive():
            p.kill()
    if [p.exitcode for p in procs] != [0, 0]:
        fail("ddp", f"ranks exited {[p.exitcode for p in procs]} (an empty batch on rank 1 at step 2)")
        return
    r0, r1 = (json.loads((work / f"rank{r}").read_text()) for r in (0, 1))
    ok = r0 == r1 and r0["seen"] == 11 * 2048
    (say if ok else fail)("ddp", f"2 NCCL ranks, rank 1 empty at step 2: tokens seen {r0['seen']} / {r1['seen']}, "
                                 f"decoders equal: {r0['w'] == r1['w']}")


def demo(work: Path) -> None:
    if not usable_gpus():
        say("demo", "skipped (no usable GPU; the CPU run is the demo's own test)")
        return
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "scope_ray.cli", "demo", "--workdir", str(work / "demo")],
                          capture_output=True, text=True, timeout=1200)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        fail("demo", f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-3:]}")
        return
    timing = [line for line in proc.stdout.splitlines() if line.strip().startswith("stages ")]  # per-stage seconds
    say("demo", f"end to end on the GPU in {seconds:.0f} s (README's CPU figure: 320 s on 2 idle cores)")
    for line in timing:
        say("demo", line.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", action="append", default=[], choices=SECTIONS, help="leave a section out")
    args = parser.parse_args(argv)
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    print(f"gpu_smoke {time.strftime('%Y-%m-%d %H:%M')}: {usable_gpus()} usable GPU(s)"
          + ("" if usable_gpus() else " — no usable GPU here: running the CPU parts only"), flush=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    steps = {"env": env, "placement": placement, "checkpoint": lambda: checkpoint(work), "throughput": throughput,
             "agreement": agreement, "sae": sae_steps, "cds-memory": cds_memory, "ddp": lambda: ddp(work),
             "demo": lambda: demo(work)}
    try:
        for name in SECTIONS:
            if name in args.skip:
                say(name, "skipped (--skip)")
                continue
            t = time.perf_counter()
            try:
                steps[name]()
            except Exception as exc:  # noqa: BLE001 - one section's crash is its FAIL, the rest still run
                fail(name, f"{type(exc).__name__}: {exc}")
            say(name, f"({time.perf_counter() - t:.1f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("gpu_smoke: " + (f"FAILED: {', '.join(FAILED)}" if FAILED else "all run sections passed"), flush=True)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
