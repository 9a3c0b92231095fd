"""train-sae's step under DDP with two real gloo ranks on the CPU (no Ray: torch.distributed as
Ray Train sets it up): a rank whose batch has no finite row still joins every collective, and the
SAE's statistics (θ, dead counters, revivals, tokens seen) are the global batch's on every rank.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os

import pytest
import torch

D, Q, K, STEPS, EMPTY_STEP, BATCH = 16, 64, 2, 8, 3, 32


def _rank_main(rank: int, store: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from scope_ray.sae import BatchTopKSAE
    from scope_ray.stages.train_sae import _LossModule, make_stats_reducer, train_step

    torch.set_num_threads(1)
    # A short collective timeout: a rank left waiting fails in seconds rather than hanging.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=20))
    torch.manual_seed(0)  # identical initial dictionaries, as train_loop seeds every worker
    sae = BatchTopKSAE(D, Q, K, k_aux=8, dead_after_tokens=40)
    sae.train()
    sae.stats_reducer = make_stats_reducer(dist)
    module = DistributedDataParallel(_LossModule(sae, 1 / 32), broadcast_buffers=False)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
    fed, per_step = 0, []
    for step in range(STEPS):
        x = torch.randn(BATCH, D, generator=data).relu() * 3
        if step == EMPTY_STEP and rank == 1:
            x = x[:0]  # every row was NaN and filtered out
        fed += len(x)
        train_step(module, sae, opt, x)
        per_step.append({"tokens_seen": int(sae.num_tokens_seen), "threshold": float(sae.threshold)})
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"fed": fed, "per_step": per_step, "revived": int(sae.revived_total),
                   "tokens_since_fired": sae.tokens_since_fired.tolist(), "W_dec": sae.W_dec.detach().flatten().tolist()}, f)
    dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_an_empty_rank_joins_the_collectives_and_the_statistics_are_global(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, str(tmp_path / "store"), str(tmp_path))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=150)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0], "a rank failed or hung (collectives out of step)"
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["fed"] == STEPS * BATCH and r1["fed"] == (STEPS - 1) * BATCH
    # Tokens seen are the global batch's: after each step, the sum of what both ranks fed so far.
    expect, seen = [], 0
    for step in range(STEPS):
        seen += BATCH + (0 if step == EMPTY_STEP else BATCH)
        expect.append(seen)
    assert [s["tokens_seen"] for s in r0["per_step"]] == expect == [s["tokens_seen"] for s in r1["per_step"]]
    # θ, the dead counters and the revival count are identical on both ranks (one global statistic),
    # and DDP kept the dictionaries identical through the empty step.
    assert [s["threshold"] for s in r0["per_step"]] == [s["threshold"] for s in r1["per_step"]]
    assert r0["per_step"][0]["threshold"] > 0
    assert r0["tokens_since_fired"] == r1["tokens_since_fired"] and r0["revived"] == r1["revived"]
    assert torch.allclose(torch.tensor(r0["W_dec"]), torch.tensor(r1["W_dec"]), atol=1e-6)
