"""SNN evaluation in cache-sized chunks against whole batches (ResNet-20 and VGG-16, CPU).

    python benchmarks/snn_eval.py [--quick] [--threads N]

`harness.train.evaluate_snn` simulates each evaluation batch in chunks of images whose
largest layer tensor is about 8 MiB (`harness.convert.simulation_chunk`: 128 images for
ResNet-20, 32 for VGG-16), so a step's tensors stay in the cache. Side by side, in one
run, interleaved: the same 512 random 32x32 images (random weights, lambda = 2), one eval
batch of 512, simulated whole (the code before) and in those chunks, at T = 8. The outputs are compared first: the largest difference of the running mean
output and the share of images whose prediction agrees at every T.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks._common import DEFAULT_REPS, command, interleaved, main, section, set_threads, table

SCRIPT = "snn_eval.py"
TITLE = "SNN evaluation in cache-sized chunks"
FULL = dict(images=512, batch=512, T=(8,), archs=("resnet20", "vgg16"))
QUICK = dict(images=256, batch=256, T=(2,), archs=("resnet20",))


def run(quick: bool, threads: int, reps: int = DEFAULT_REPS) -> str:
    import harness
    from harness.convert import simulation_chunk, to_snn

    set_threads(threads)
    spec = QUICK if quick else FULL
    torch.manual_seed(0)
    x = torch.randn(spec["images"], 3, 32, 32)
    rows = []
    for arch in spec["archs"]:
        model = harness.create_model(arch, num_classes=10, L=4, lam_init=2.0).eval()
        snn = to_snn(model)
        chunk = simulation_chunk(model, x[:spec["batch"]])

        def simulate(T: int, size: int) -> torch.Tensor:
            with torch.no_grad():
                return torch.cat([snn.simulate(c, T) for b in x.split(spec["batch"]) for c in b.split(size)], 1)

        for T in spec["T"]:
            whole, chunked = simulate(T, spec["batch"]), simulate(T, chunk)
            agree = (whole.argmax(-1) == chunked.argmax(-1)).all(0).float().mean().item()
            diff = (whole - chunked).abs().max().item()
            med = interleaved({"whole": lambda T=T: simulate(T, spec["batch"]),
                               "chunks": lambda T=T: simulate(T, chunk)}, reps)
            rows.append([arch, T, spec["batch"], chunk, f"{med['whole']:.3f}", f"{med['chunks']:.3f}",
                         f"{med['whole'] / med['chunks']:.2f}×", f"{diff:.1e}", f"{100 * agree:.1f}%"])
    body = (f"{spec['images']:,} random 32×32 images, random weights (λ = 2, L = 4), eval batches of "
            f"{spec['batch']}; {threads} torch thread(s); medians of {reps} interleaved repetitions after one "
            "warm-up.\n\n"
            + table(["model", "T", "batch", "chunk", "whole batches s", "chunks s", "speed-up",
                     "largest Δ of an output", "same prediction at every T"], rows))
    return section(TITLE, command(SCRIPT, quick, threads), body)


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0])
