"""The BMA training step on one GPU at the paper preset: fp32 against bf16 autocast, channels_last
and compiled encoders; pairs/s, peak memory and the share of the GPU's peak throughput.

The step is the one ``avlab run`` takes (forward ``training_step``, backward, Adam) on the paper
preset's model (ResNet-18 / ResNet-10 of width 64, 224 px images, 150×200 log-mels, n = 1000)
with a batch of paired plus unpaired-sound data held on the GPU, so the numbers are the model's,
not the input pipeline's. FLOPs per step come from ``torch.utils.flop_counter`` (matmuls and
convolutions, forward and backward); achieved TFLOP/s over the peak given by ``--peak-tflops``
(dense bf16 tensor-core peak of the GPU; H100 SXM: 989) is the share of peak.

    .venv/bin/python benchmarks/gpu_step.py --peak-tflops 989          # on a GPU machine, ~3 min
    .venv/bin/python benchmarks/gpu_step.py --device cpu --preset tiny --batch 16 --steps 2 --no-append

It prints a table and appends it to ``benchmarks/RESULTS.md`` (``--no-append`` to skip).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import results  # benchmarks/results.py, next to this script
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from methods.data import ProceduralAV  # noqa: E402
from methods.encoders import ResNetEncoder, VGGEncoder  # noqa: E402
from methods.registry import build_method  # noqa: E402
from orchestrator.config import resolve  # noqa: E402

VARIANTS = {  # name: (bf16 autocast, channels_last, compiled encoders)
    "fp32": (False, False, False),
    "bf16": (True, False, False),
    "bf16 + channels_last": (True, True, False),
    "bf16 + channels_last + compile": (True, True, True),
}


def make_batch(cfg, b: int, device: torch.device) -> dict[str, torch.Tensor]:
    d = cfg.data
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(b, 3, d.image_size, d.image_size, generator=g)}
    batch |= {k: torch.randn(b, 1, d.n_mels, d.n_frames, generator=g) for k in ("sound", "usound", "usound_aug")}
    batch["index"] = torch.arange(b)
    return {k: v.to(device) for k, v in batch.items()}


def run_variant(preset: str, b: int, device: torch.device, steps: int, bf16: bool, nhwc: bool, compiled: bool):
    cfg = resolve({}, preset=preset)
    torch.manual_seed(0)
    method = build_method("bma", cfg.method, ProceduralAV(cfg.data).info()).to(device)
    batch = make_batch(cfg, b, device)
    if nhwc:
        method = method.to(memory_format=torch.channels_last)
        batch = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in batch.items()}
    if compiled:
        for module in method.modules():
            if isinstance(module, (ResNetEncoder, VGGEncoder)):
                module.compile()  # in place: the state_dict keeps its names
    optimizer = torch.optim.Adam(method.parameters(), lr=cfg.optim.lr)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = method(batch).metrics["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):  # warm-up (and compilation)
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return b / seconds, flops / seconds / 1e12, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--batch", type=int, default=128, help="pairs per step on this GPU")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the device's dense bf16 peak")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_step.py: no CUDA device here (use --device cpu for a smoke run)")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows = []
    for variant in args.variants:
        rate, tflops, peak = run_variant(args.preset, args.batch, device, args.steps, *VARIANTS[variant])
        share = f"{tflops / args.peak_tflops:.1%}" if args.peak_tflops else "-"
        rows.append(f"| {variant} | {rate:.0f} | {tflops:.2f} | {share} | {peak:.1f} |")
        print(rows[-1], flush=True)
    commit = results.commit()
    lines = [
        f"{dt.date.today().isoformat()}, {name}, commit {commit}, `benchmarks/gpu_step.py --device {args.device} "
        f"--preset {args.preset} --batch {args.batch} --steps {args.steps} --peak-tflops {args.peak_tflops:g}` "
        "(BMA step: paired + unpaired sound, Adam; data on the device).",
        "",
        "| variant | pairs/s | achieved TFLOP/s | share of peak | peak memory GiB |",
        "| --- | --- | --- | --- | --- |",
        *rows,
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_append:
        results.record("Training throughput on one GPU: the BMA step at the paper preset", text)


if __name__ == "__main__":
    main()
