"""BMA-Memory: the cost of memory addressing against memory size n and batch size B, next to the
encoders' cost, on the tiny preset (CPU).

One BMA model of the tiny preset (ResNet-18 / ResNet-10 of base width 16, 32 px images, 40×64
log-mels, c = 128) is built per n. A step's batch holds B paired images and sounds plus B
unpaired sounds and B unpaired images, two views each, as the tiny preset trains. For every
(B, n) it times, in ms per step:

1. the full training step: zero_grad, forward ``training_step``, backward, Adam step;
2. the memory alone: the 8 addressings + reads of one step (2 for the paired representations,
   3 on each unpaired cyclic path, chained as in the step) on random (B, c) features with
   requires_grad, backward through them, and Adam on M^v and M^s;
3. the encoders alone: forward + backward of the step's 3 E_v and 3 E_s calls.

Within each B the sizes n take turns in blocks of steps for several rounds, and each figure is
the median over the rounds, so drifts of the machine hit all sizes alike. The target (issue):
memory addressing at n = 5000 adds < 10 % to the tiny step (B = 128) over n = 10.

    .venv/bin/python benchmarks/memory_addressing.py            # ~3 min on 2 idle CPU cores
    .venv/bin/python benchmarks/memory_addressing.py --quick    # smoke run, ~15 s, no append

It prints a table and appends it to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import results  # benchmarks/results.py, next to this script
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from methods.bma import BimodalAssociativeMemory, BMAMemory  # noqa: E402
from methods.data import ProceduralAV  # noqa: E402
from methods.registry import build_method  # noqa: E402
from orchestrator.config import ExperimentConfig, resolve  # noqa: E402

SIZES = (10, 100, 500, 1000, 2000, 5000)
BATCHES = (64, 128, 256)
TARGET_N, TARGET_B, TARGET_OVERHEAD = 5000, 128, 0.10
KINDS = ("step", "memory", "encoders")


def tiny_config(n: int) -> ExperimentConfig:
    return resolve({}, preset="tiny", overrides=[f"method.memory_size={n}"])


def make_batch(cfg: ExperimentConfig, b: int) -> dict[str, torch.Tensor]:
    """Random tensors shaped like one tiny step's batch: paired pool + both unpaired pools."""
    d = cfg.data
    g = torch.Generator().manual_seed(0)
    image = (3, d.image_size, d.image_size)
    sound = (1, d.n_mels, d.n_frames)
    batch = {k: torch.rand(b, *image, generator=g) for k in ("image", "uimage", "uimage_aug")}
    batch |= {k: torch.randn(b, *sound, generator=g) for k in ("sound", "usound", "usound_aug")}
    batch["index"] = torch.arange(b)
    return batch


def memory_reads(mem: BimodalAssociativeMemory, f: dict[str, torch.Tensor]) -> torch.Tensor:
    """The memory calls of one ``training_step``, chained the same way; a scalar to backward."""
    reads = [mem.image_to_sound(f["image"]), mem.sound_to_image(f["sound"])]  # h^v, h^s
    f_v_mem = mem.sound_to_image(f["usound"])  # S->I->S, then h^s of the second view
    reads += [f_v_mem, mem.image_to_sound(f_v_mem), mem.sound_to_image(f["usound_aug"])]
    f_s_mem = mem.image_to_sound(f["uimage"])  # I->S->I, then h^v of the second view
    reads += [f_s_mem, mem.sound_to_image(f_s_mem), mem.image_to_sound(f["uimage_aug"])]
    return torch.stack([r.sum() for r in reads]).sum()


def timers(method: BMAMemory, batch: dict[str, torch.Tensor], lr: float) -> dict[str, Callable[[], None]]:
    """One callable per measured kind, each doing one step's worth of that work."""
    opt = torch.optim.Adam(method.parameters(), lr=lr)
    mem = method.memory
    mem_opt = torch.optim.Adam(mem.parameters(), lr=lr)
    b, c = batch["image"].shape[0], mem.M_v.shape[1]
    g = torch.Generator().manual_seed(1)
    features = {k: torch.randn(b, c, generator=g).requires_grad_()
                for k in ("image", "sound", "usound", "usound_aug", "uimage", "uimage_aug")}
    encoders = [p for m in (method.E_v, method.E_s) for p in m.parameters()]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        method(batch).metrics["loss"].backward()
        opt.step()

    def memory() -> None:
        mem_opt.zero_grad(set_to_none=True)
        for f in features.values():
            f.grad = None
        with mem.shared_keys():  # as in training_step: keys normalised once per step
            loss = memory_reads(mem, features)
        loss.backward()
        mem_opt.step()

    def encoders_only() -> None:
        for p in encoders:
            p.grad = None
        f = [method.E_v(batch[k]) for k in ("image", "uimage", "uimage_aug")]
        f += [method.E_s(batch[k]) for k in ("sound", "usound", "usound_aug")]
        torch.stack([x.mean() for x in f]).sum().backward()

    return {"step": step, "memory": memory, "encoders": encoders_only}


def gflops(fn: Callable[[], None]) -> float:
    """Floating-point operations of one call (matmuls and convolutions, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def block_ms(fn: Callable[[], None], steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return 1000 * (time.perf_counter() - t0) / steps


def measure(sizes: tuple[int, ...], b: int, steps: int, rounds: int) -> dict[int, dict[str, float]]:
    """Median ms per step of each kind for every n at batch ``b``; the sizes (and kinds) take
    turns in blocks of ``steps`` steps for ``rounds`` rounds."""
    runs: dict[int, dict[str, Callable[[], None]]] = {}
    for n in sizes:
        cfg = tiny_config(n)
        torch.manual_seed(0)
        method = build_method("bma", cfg.method, ProceduralAV(cfg.data).info())
        assert isinstance(method, BMAMemory)
        runs[n] = timers(method, make_batch(cfg, b), cfg.optim.lr)
        for fn in runs[n].values():
            block_ms(fn, 2)  # warm-up
    flops = {n: {f"{k}_gflop": gflops(runs[n][k]) for k in ("memory", "encoders")} for n in sizes}
    samples: dict[int, dict[str, list[float]]] = {n: {k: [] for k in KINDS} for n in sizes}
    for _ in range(rounds):
        for n in sizes:
            for kind in KINDS:
                samples[n][kind].append(block_ms(runs[n][kind], steps))
    return {n: {**{k: statistics.median(v) for k, v in per.items()}, **flops[n]} for n, per in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="memory sizes n")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES), help="batch sizes B")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=5, help="blocks per (B, n, kind), taking turns")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: n 10 and {TARGET_N}, B {TARGET_B}, 2 rounds; implies --no-append")
    parser.add_argument("--no-append", action="store_true", help="print only; leave RESULTS.md")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.batches, args.steps, args.rounds = [10, TARGET_N], [TARGET_B], 2, 2
        args.no_append = True
    torch.set_num_threads(args.threads)
    sizes = tuple(sorted(set(args.sizes)))
    batches = tuple(sorted(set(args.batches)))

    t0 = time.perf_counter()
    timings = {b: measure(sizes, b, args.steps, args.rounds) for b in batches}
    elapsed = time.perf_counter() - t0

    commit = results.commit()
    command = "benchmarks/memory_addressing.py --quick" if args.quick else (
        f"benchmarks/memory_addressing.py --sizes {' '.join(map(str, sizes))} "
        f"--batches {' '.join(map(str, batches))} --steps {args.steps} --rounds {args.rounds}")
    lines = [
        f"{dt.date.today().isoformat()}, {platform.machine()}, {args.threads} threads, commit {commit}, "
        f"`{command}` (ResNet-18 / ResNet-10 of width 16, c = 128; each step B pairs + B unpaired sounds "
        f"+ B unpaired images, two views each; Adam; median ms per step over {args.rounds} blocks of "
        f"{args.steps}; {elapsed:.0f} s). Memory: the step's 8 addressings + reads, backward, Adam on "
        "M^v, M^s. Encoders: the step's 6 encoder calls, forward + backward.",
        "",
        "| B | n | step ms | memory ms | encoders ms | memory GFLOP | encoders GFLOP | memory share of step | overhead vs n=10 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for b, per_n in timings.items():
        base = per_n.get(10, {}).get("step")
        for n, r in per_n.items():
            overhead = f"{100 * (r['step'] / base - 1):+.1f} %" if base else "-"
            lines.append(f"| {b} | {n} | {r['step']:.1f} | {r['memory']:.2f} | {r['encoders']:.1f} | "
                         f"{r['memory_gflop']:.2f} | {r['encoders_gflop']:.2f} | "
                         f"{100 * r['memory'] / r['step']:.1f} % | {overhead} |")
    lines.append("")
    target = timings.get(TARGET_B, {})
    if TARGET_N in target and 10 in target:
        r, ref = target[TARGET_N], target[10]
        overhead = r["step"] / ref["step"] - 1  # the verdict: end to end, against a near-free memory
        alone = r["memory"] / (r["step"] - r["memory"])  # from the parts: memory over the rest of the step
        verdict = "met" if overhead < TARGET_OVERHEAD else "not met"
        lines.append(f"Target, memory addressing at n = {TARGET_N} adds < {100 * TARGET_OVERHEAD:.0f} % to "
                     f"the tiny step (B = {TARGET_B}): {verdict}, {r['step']:.0f} ms per step against "
                     f"{ref['step']:.0f} ms at n = 10 ({100 * overhead:+.1f} %); from the parts, the memory's "
                     f"{r['memory']:.1f} ms add {100 * alone:.1f} % to the rest of the step.")
    else:
        lines.append(f"Target (n = {TARGET_N} against n = 10 at B = {TARGET_B}): not measured in this run.")
    text = "\n".join(lines)
    print(text)
    if not args.no_append:
        results.record("BMA memory addressing cost (tiny preset, CPU)", text)


if __name__ == "__main__":
    main()
