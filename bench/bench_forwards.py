"""Forwards per image in the instability and probe-features actors, before and after sharing
blocks 1…L (issue 19): block calls counted at the attention modules, wall time measured.

- instability, before: ``patch_attention`` and ``forward_layer`` (blocks 1…L twice);
  after: ``patch_attention_and_layer`` (once).
- probe-features, before: four ``final_tokens`` forwards, one per variant (original and three
  removals; 4 × depth blocks); after: ``designated_output`` once, then ``final_tokens(...,
  start_from=...)`` per variant (L + 4 × (depth − L) blocks). The removal edit here is a fixed
  rescaling of the patch tokens (the SAE's cost is the same before and after and is left out).

    .venv/bin/python bench/bench_forwards.py                        # clip-vit-b16 and deit3-s, batch 8
    .venv/bin/python bench/bench_forwards.py --models clip-vit-b16 --batch 16 --repeats 5

Random-init weights at the registry's designated layer, CPU, fp32. Both sides compute the same
numbers (checked bit for bit before timing).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from scope_ray.models import build_model

VARIANTS = 4


def _counting(model):
    calls = [0]
    handles = [b.attn.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for b in model.blocks]
    return calls, handles


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["clip-vit-b16", "deit3-s"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, fp32, batch {args.batch}")
    for name in args.models:
        model = build_model(name)
        size = model.spec.image_size
        images = np.random.default_rng(0).integers(0, 256, (args.batch, size, size, 3), dtype=np.uint8)
        pixels = model.preprocess(images)
        edits = [None] + [lambda t, f=f: t * f for f in (0.9, 0.8, 0.7)][: VARIANTS - 1]

        def inst_before():
            return model.patch_attention(pixels), model.forward_layer(pixels)

        def inst_after():
            return model.patch_attention_and_layer(pixels)

        def probe_before():
            return [model.final_tokens(pixels, edit=e) for e in edits]

        def probe_after():
            start = model.designated_output(pixels)
            return [model.final_tokens(pixels, edit=e, start_from=start) for e in edits]

        with torch.inference_mode():
            a, b = inst_before(), inst_after()
            assert torch.equal(a[0], b[0]) and torch.equal(a[1].patch_tokens, b[1].patch_tokens)
            assert all(torch.equal(x, y) for x, y in zip(probe_before(), probe_after()))
            rows = []
            for stage, before, after in (("instability", inst_before, inst_after), ("probe-features", probe_before, probe_after)):
                counts = []
                for fn in (before, after):
                    calls, handles = _counting(model)
                    fn()
                    for h in handles:
                        h.remove()
                    counts.append(calls[0])
                times = [_time(fn, args.repeats) for fn in (before, after)]
                rows.append((stage, counts, times))
        print(f"\n{name}: layer {model.layer} of {model.depth}")
        print(f"| stage | block calls per image, before | after | s per batch, before | after | speed-up |")
        print("|---|---|---|---|---|---|")
        for stage, (c0, c1), (t0, t1) in rows:
            print(f"| {stage} | {c0} | {c1} | {t0:.3f} | {t1:.3f} | {t0 / t1:.2f}x |")


if __name__ == "__main__":
    main()
