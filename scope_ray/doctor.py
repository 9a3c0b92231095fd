"""`scope-ray doctor`: what a long run needs, checked before it starts.

Each check returns a :class:`Check` (passed or not, one line of detail and, when it failed, what
to do). Nothing here changes the cluster or the results root beyond one probe object that
``ResultsRoot.check_writable`` writes and deletes.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from scope_ray.config import JobConfig
from scope_ray.logs import info

# Seconds to wait for a model hub before calling it unreachable: long enough for a slow link,
# short enough that an offline cluster gets its answer at once.
HUB_TIMEOUT_S = 5.0
# Seconds the token-auth probe waits for the cluster's GCS or dashboard to answer.
AUTH_PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def check_ray(address: str | None) -> tuple[Check, dict | None, dict | None, "AuthProbe"]:
    """Connect (or start a local instance, as `scope-ray run` would) and list the resources;
    returns the check, the cluster's resources (None when they could not be read), when the
    cluster has GPUs what torch said on one of them (``probe_gpu_node``, run while connected),
    and whether the cluster answers a caller without a token (``probe_auth_mode``)."""
    import ray

    if address and address.startswith(("http://", "https://")):
        # A dashboard address is what the Jobs API (and `scope-ray sweep`) talk to; the cluster's
        # resources are visible from inside it: `ray job submit -- scope-ray doctor` shows them.
        from ray.job_submission import JobSubmissionClient

        auth = probe_auth_mode(address)  # asked without a token, whatever this client has
        try:
            JobSubmissionClient(address).list_jobs()
        except Exception as err:  # connection refused, bad token, wrong port: all one answer
            return Check("ray", False, f"Jobs API at {address} not reachable: {type(err).__name__}: {err}",
                         "check the address (dashboard port, usually 8265) and, with token auth, RAY_AUTH_MODE=token "
                         "and the token (~/.ray/auth_token or RAY_AUTH_TOKEN)"), None, None, auth
        return Check("ray", True, f"Jobs API at {address} answers (submit `scope-ray doctor` as a job to see its "
                                  "resources)"), None, None, auth
    started_here = not ray.is_initialized()
    # With no address, ray.init() joins an instance already running on this machine when there is
    # one (Ray records it in its temp dir) and starts one otherwise: say which happened.
    existing = _running_here() if not address else ""
    try:
        if started_here:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(include_dashboard=False, log_to_driver=False)
        # The GCS this process is connected to ("auto" and a local instance resolved): asked
        # without a token, from outside Ray's own client, which would send this machine's token.
        gcs = ray.get_runtime_context().gcs_address
        auth = probe_auth_mode(gcs)
        total = ray.cluster_resources()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        gpu_node = probe_gpu_node() if total.get("GPU", 0) else None
    except Exception as err:
        direct = address and address != "auto" and "://" not in address
        auth = (probe_auth_mode(address) if direct
                else AuthProbe(None, address or "a local instance", "Ray was not reached (see the ray check)"))
        return Check("ray", False, f"cannot connect to Ray at {address!r}: {type(err).__name__}: {err}",
                     "start the cluster (`ray start --head`) or unset RAY_ADDRESS to run on a local instance"), None, None, auth
    finally:
        if started_here and ray.is_initialized():
            ray.shutdown()
    where = where_ray_is(address, started_here, existing, gcs)
    gib = 1024 ** 3
    detail = (f"{where}; {len(nodes)} node(s), {total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs, "
              f"{total.get('memory', 0) / gib:.1f} GiB memory, {total.get('object_store_memory', 0) / gib:.1f} GiB object store")
    return Check("ray", True, detail), total, gpu_node, auth


def where_ray_is(address: str | None, started_here: bool, existing: str, gcs: str) -> str:
    """Which Ray the checks ran on, in words: the one asked for, the one this process was already
    connected to, one already running on this machine (what ``ray.init()`` joins without an
    address), or a new local instance."""
    if address:
        return f"cluster at {address}"
    if not started_here:
        return f"the Ray instance this process is already connected to ({gcs})"
    if existing and gcs == existing:
        return f"no RAY_ADDRESS: joined the Ray instance already running on this machine ({gcs}), as `scope-ray run` would"
    return "no RAY_ADDRESS: a new local single-node instance (what `scope-ray run` starts when none is running)"


def _running_here() -> str:
    """The GCS address of a Ray instance this machine's Ray temp dir names, or ""."""
    try:
        from ray._private.utils import read_ray_address

        return read_ray_address() or ""
    except Exception:  # noqa: BLE001 - a private helper: any failure means "none known"
        return ""


@dataclass(frozen=True)
class AuthProbe:
    """What the cluster said to a caller that sent no token: ``mode`` "token" (refused it),
    "disabled" (answered it) or None (no answer that settles it; ``how`` says why)."""

    mode: str | None
    where: str
    how: str


def probe_auth_mode(address: str, timeout_s: float = AUTH_PROBE_TIMEOUT_S) -> AuthProbe:
    """Ask the cluster at ``address``, without a token, whether it requires one.

    * ``http(s)://`` (the dashboard / Jobs API): Ray's public ``/api/authentication_mode``
      (no token needed, Ray >= 2.52); where that is missing (an older Ray, which has no token auth),
      whether ``/api/jobs/`` answers without a token.
    * ``host:port`` (the GCS): one ``GetClusterId`` call on a plain gRPC channel that carries no
      token. A GCS with token auth answers UNAUTHENTICATED; one without answers the call, which
      is exactly what lets anyone who reaches the port use the cluster.
    """
    if address.startswith(("http://", "https://")):
        base = address.rstrip("/")
        try:
            with urllib.request.urlopen(f"{base}/api/authentication_mode", timeout=timeout_s) as r:
                mode = json.loads(r.read()).get("authentication_mode")
            return AuthProbe(mode if mode in ("token", "disabled") else None, address,
                             f"its dashboard's /api/authentication_mode says {mode!r}")
        except urllib.error.HTTPError as err:
            if err.code != 404:
                return AuthProbe(None, address, f"/api/authentication_mode answered HTTP {err.code}")
        except Exception as err:  # noqa: BLE001 - unreachable: no answer that settles it
            return AuthProbe(None, address, f"its dashboard did not answer ({type(err).__name__}: {err})")
        try:
            urllib.request.urlopen(f"{base}/api/jobs/", timeout=timeout_s).close()
            return AuthProbe("disabled", address, "its Jobs API lists jobs for a request without a token")
        except urllib.error.HTTPError as err:
            if err.code in (401, 403):
                return AuthProbe("token", address, f"its Jobs API refuses a request without a token (HTTP {err.code})")
            return AuthProbe(None, address, f"its Jobs API answered HTTP {err.code}")
        except Exception as err:  # noqa: BLE001
            return AuthProbe(None, address, f"its Jobs API did not answer ({type(err).__name__}: {err})")
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    if "://" in address:  # ray:// (Ray Client) speaks another protocol
        return AuthProbe(None, address, "only a GCS address (head:6379) or a dashboard URL (http://head:8265) can be "
                                        "probed, not a Ray Client address")
    # No proxy: the GCS is asked directly, as anyone on its network could.
    channel = grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)])
    try:
        gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
            gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s)
        return AuthProbe("disabled", address, "its GCS answers a gRPC call that carries no token")
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.UNAUTHENTICATED:
            return AuthProbe("token", address, "its GCS refuses a gRPC call without a token (UNAUTHENTICATED)")
        return AuthProbe(None, address, f"its GCS did not answer the probe ({err.code().name}: {err.details()})")
    finally:
        channel.close()


# The fix for a cluster without token auth: the README's and cluster/README.md's start-up.
NO_AUTH_FIX = ("restart it with token authentication: `ray get-auth-token --generate` once, then "
               "`RAY_AUTH_MODE=token ray start --head ...` on every node (README, 'Token authentication'; "
               "cluster/README.md)")


def check_auth(probe: AuthProbe, token_source: str | None) -> Check:
    """The verdict on what the cluster said to a caller without a token (``probe_auth_mode``) and
    on this machine's token (``token_source``: where it comes from, never the token).

    Fails when the cluster answers without a token (anyone who reaches its ports can run code on
    it and read what it reads, the results bucket's credentials included), when it could not be
    told whether it does, and when it wants a token this machine does not have."""
    mode_here = os.environ.get("RAY_AUTH_MODE", "")
    here = f"RAY_AUTH_MODE={mode_here or '(unset)'} here, token {'from ' + token_source if token_source else 'not found'}"
    if probe.mode == "disabled":
        return Check("auth", False, f"the Ray cluster at {probe.where} runs WITHOUT token authentication "
                                    f"({probe.how}): anyone who can reach it can run code on it", NO_AUTH_FIX)
    if probe.mode is None:
        return Check("auth", False, f"cannot tell whether the Ray cluster at {probe.where} requires a token: {probe.how}",
                     "make the cluster reachable from here (GCS port or dashboard URL) and run doctor again")
    if token_source is None or mode_here.lower() != "token":
        return Check("auth", False, f"the Ray cluster at {probe.where} requires a token ({probe.how}); {here}",
                     "set RAY_AUTH_MODE=token and copy the cluster's token to ~/.ray/auth_token (or RAY_AUTH_TOKEN)")
    return Check("auth", True, f"the Ray cluster at {probe.where} requires a token ({probe.how}); {here}")


def check_gpus(ray_gpus: float | None = None, gpu_node: dict | None = None) -> Check:
    """GPUs torch sees on this machine, against the GPUs Ray advertises (``ray_gpus``; None =
    unknown), and what torch said on a GPU node Ray chose (``gpu_node``: ``probe_gpu_node``).

    They differ legitimately on a cluster (the GPUs sit on the workers), so a GPU-less head is
    fine; failures are a machine whose torch sees GPUs a local Ray does not advertise (stages
    would run on CPUs), and GPUs Ray advertises that torch on their node cannot use (the driver
    is too old for the wheel's CUDA, or the wheel has no kernels for the GPU's architecture)."""
    import torch

    from scope_ray.devices import cuda_problem, wheel_facts

    ray_part = "" if ray_gpus is None else f"; Ray advertises {ray_gpus:g}"
    if gpu_node is not None and gpu_node.get("problem"):
        return Check("gpus", False, f"Ray advertises {ray_gpus:g} GPU(s), but on GPU node {gpu_node.get('ip', '?')} "
                                    f"torch cannot use them: {gpu_node['problem']}",
                     "install a torch build matching the nodes' NVIDIA driver and GPUs (constraints.txt pins the "
                     "CUDA 13 build: it needs a recent driver), or run with the ray GPU settings at 0")
    node_part = "" if gpu_node is None else f"; on GPU node {gpu_node.get('ip', '?')}: {gpu_node.get('name', '?')} usable"
    seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if seen == 0:
        return Check("gpus", True, f"torch sees no CUDA GPU here{ray_part}{node_part} ({wheel_facts()}): stages on "
                                   "this machine run on CPUs; GPU work runs where Ray grants a GPU")
    names = [torch.cuda.get_device_name(i) for i in range(seen)]
    if ray_gpus == 0:
        return Check("gpus", False, f"torch sees {seen} GPU(s) ({', '.join(names)}) but Ray advertises none",
                     "start Ray with --num-gpus or check CUDA_VISIBLE_DEVICES where Ray was started")
    problem = cuda_problem()
    if problem is not None:
        return Check("gpus", False, f"torch sees {seen} GPU(s) here but cannot use them: {problem}",
                     "install a torch build for this driver and these GPUs")
    return Check("gpus", True, f"torch sees {seen} GPU(s): {', '.join(names)}{ray_part}{node_part}")


def probe_gpu_node(timeout_s: float = 120.0) -> dict | None:
    """Ask one GPU of the connected cluster what torch makes of it: a Ray task granted one GPU
    reports its node, the device name and ``cuda_problem()``. None when it could not run in time."""
    import ray

    def probe() -> dict:
        from scope_ray.devices import cuda_problem, wheel_facts

        problem = cuda_problem()
        name = "?"
        if problem is None:
            import torch

            name = torch.cuda.get_device_name(0)
        return {"ip": ray.util.get_node_ip_address(), "problem": problem, "name": name, "wheel": wheel_facts()}

    ref = ray.remote(num_gpus=1, num_cpus=0)(probe).remote()
    try:
        return ray.get(ref, timeout=timeout_s)
    except Exception:  # noqa: BLE001 - a busy or unplaceable GPU: reported as unchecked, not as a failure
        ray.cancel(ref, force=True)
        return None


def check_data(job: JobConfig) -> Check:
    """Every data source the job names exists (a typo in a path is found here, not hours into a
    run). Existence only: each stage still checks its source's contents before it starts."""
    import pyarrow.fs as pafs

    from scope_ray.storage import arrow_filesystem

    named, missing = [], []
    for dataset in ("imagenet", "ade20k", "nyud"):
        for split in ("train", "val"):
            source = getattr(getattr(job.data, dataset), split)
            if source is None:
                continue
            key = f"data.{dataset}.{split}.path"
            named.append(key)
            try:
                fs, path = arrow_filesystem(source.path, job.storage.endpoint_url)
                found = fs.get_file_info(path).type != pafs.FileType.NotFound
            except Exception as err:  # noqa: BLE001 - an unreachable store is as fatal as a missing path
                missing.append(f"{key}={source.path} ({type(err).__name__}: {err})")
                continue
            if not found:
                missing.append(f"{key}={source.path}")
    if missing:
        return Check("data", False, f"{len(missing)} of {len(named)} data path(s) do not exist: {'; '.join(missing)}",
                     "fix the path(s) in the job spec or with --set; docs/data.md shows each layout")
    if not named:
        return Check("data", True, "the job names no data source (every stage that reads images would refuse)")
    return Check("data", True, f"{len(named)} data path(s) exist: {', '.join(named)}")


def check_root(job: JobConfig) -> Check:
    from scope_ray.storage import ResultsRoot

    root = ResultsRoot(job.storage.root, job.storage.endpoint_url)
    try:
        root.check_writable()
    except Exception as err:
        return Check("results root", False, f"{root.uri}: {type(err).__name__}: {err}",
                     "fix the permissions / bucket / credentials (standard AWS chain), or set storage.root")
    return Check("results root", True, f"{root.uri} is writable")


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import constants

    return (Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}").is_dir()


def _reachable(url: str) -> str | None:
    """None when the URL answers (any HTTP status counts: the host is there), else why not."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=HUB_TIMEOUT_S)
    except urllib.error.HTTPError:
        return None
    except Exception as err:
        return f"{type(err).__name__}: {getattr(err, 'reason', err)}"
    return None


def pretrained_sources(job: JobConfig) -> tuple[str | None, str | None]:
    """(Hugging Face repo id, direct URL) the model library would download the weights from."""
    spec = job.model.spec
    if spec.loader == "open_clip":
        import open_clip

        cfg = open_clip.get_pretrained_cfg(spec.arch, spec.pretrained_tag) or {}
        return (cfg.get("hf_hub") or "").rstrip("/") or None, cfg.get("url") or None
    import timm

    cfg = timm.models.get_pretrained_cfg(f"{spec.arch}.{spec.pretrained_tag}")
    return (getattr(cfg, "hf_hub_id", None) or None), (getattr(cfg, "url", None) or None)


def check_weights(job: JobConfig) -> Check:
    weights, spec = job.model.weights, job.model.spec
    if weights == "none":
        return Check("weights", True, f"{spec.name}: random init (weights: none) — fine for tests and the demo, "
                                      "not for comparing with the paper")
    if weights != "pretrained":
        from scope_ray.storage import fsspec_filesystem

        try:
            fs, path = fsspec_filesystem(weights, job.storage.endpoint_url)
            found = fs.exists(path)
        except Exception as err:
            return Check("weights", False, f"{weights}: {type(err).__name__}: {err}", "check the path and credentials")
        return Check("weights", found, f"{weights} {'exists' if found else 'does not exist'}",
                     "" if found else "copy the .safetensors file there or fix model.weights")
    if spec.pretrained_tag is None:
        return Check("weights", False, f"{spec.name} has no pretrained weights", "use weights: none or a file")
    repo, url = pretrained_sources(job)
    if repo and _hub_cached(repo):
        return Check("weights", True, f"{spec.name}: {repo} is in the local Hugging Face cache")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return Check("weights", False, f"{spec.name}: HF_HUB_OFFLINE=1 and {repo} is not cached",
                     "pre-download the weights into the cache or point model.weights at a .safetensors file")
    target = f"https://huggingface.co/api/models/{repo}" if repo else url
    why = _reachable(target) if target else "no download source known"
    if why is None:
        return Check("weights", True, f"{spec.name}: {target} reachable (downloaded on first use, on every node)")
    return Check("weights", False, f"{spec.name}: {target} not reachable ({why})",
                 "on an offline cluster put the weights in a .safetensors file (local or s3://) and set model.weights to it")


def run_doctor(job_path: str | None, overrides: list[str], log=info) -> int:
    """Run every check that applies; print one line each; exit code 0 only when all pass."""
    job = None
    if job_path is not None:
        from scope_ray.config import load_config

        job = load_config(job_path, overrides)
    address = (job.ray.address if job else None) or os.environ.get("RAY_ADDRESS")
    ray_check, resources, gpu_node, auth = check_ray(address)
    ray_gpus = None if resources is None else resources.get("GPU", 0.0)
    from scope_ray.sweep.runner import auth_token_source

    checks = [check_auth(auth, auth_token_source()), ray_check, check_gpus(ray_gpus, gpu_node)]
    if job is not None:
        checks += [check_data(job), check_root(job), check_weights(job)]
    else:
        log("(no job spec given: the results root and the weights are not checked)")
    width = max(len(c.name) for c in checks)
    for c in checks:
        log(f"{'ok  ' if c.ok else 'FAIL'} {c.name:<{width}}  {c.detail}")
        if c.fix:
            log(f"     {'':<{width}}  -> {c.fix}")
    failed = [c.name for c in checks if not c.ok]
    log("all checks passed" if not failed else f"{len(failed)} check(s) failed: {', '.join(failed)}")
    return 0 if not failed else 1
