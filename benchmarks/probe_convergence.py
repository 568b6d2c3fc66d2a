"""Whether a probe's accuracy survives last-bit changes of its features, and what convergence costs.

The features of one encoder (random initialisation, as `avlab run ... train.epochs=0` evaluates
it) are probed as extracted and after 20 relative perturbations of 1e-7 (each value times
1 + 1e-7 x N(0, 1): a change in the last bits of a float32, of the size another CPU's SIMD kernels
make; a zero, such as a ReLU's, stays zero as it does there), with the logistic probe stopped at
scikit-learn's default tolerance (1e-4, 1000 iterations: the probe before it had a tolerance)
and at the evaluation config's own (``eval.linear_tol``, ``eval.linear_max_iter``). Printed per
probe: the accuracy on the features as extracted, the range and number of distinct accuracies
over the perturbations, the solver's iterations and the seconds one fit takes.

    .venv/bin/python benchmarks/probe_convergence.py                      # multissl, small, seed 1
    .venv/bin/python benchmarks/probe_convergence.py --preset tiny method.name=bma --record

``--record`` appends the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from methods.data import build_dataset
from methods.evaluate.features import extract_features
from methods.evaluate.linear_probe import linear_probe
from methods.registry import build_method
from orchestrator.config import resolve
from orchestrator.train import seed_everything

import results  # benchmarks/results.py, next to this script

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def _probe(train_X, train_y, test_X, test_y, *, tol: float, max_iter: int) -> tuple[float, int, float]:
    t0 = time.perf_counter()
    result = linear_probe(train_X, train_y, test_X, test_y, C=1.0, max_iter=max_iter, tol=tol)
    return result.accuracy, result.iterations, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", default=["method.name=multissl", "seed=1"])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--perturbations", type=int, default=20)
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    cfg = resolve(None, preset=args.preset, overrides=["train.epochs=0", *args.overrides])
    data = build_dataset(cfg.data)
    seed_everything(cfg.seed * 1000)
    method = build_method(cfg.method_name, cfg.method, data.info()).eval()
    train = extract_features(method, data.pool("train"), batch_size=cfg.eval.batch_size)
    test = extract_features(method, data.pool("test"), batch_size=cfg.eval.batch_size)
    settings = [("sklearn default (tol 1e-4, 1000 it.)", 1e-4, 1000),
                (f"avlab (tol {cfg.eval.linear_tol:g}, {cfg.eval.linear_max_iter} it.)",
                 cfg.eval.linear_tol, cfg.eval.linear_max_iter)]
    rng = np.random.default_rng(0)
    lines = [f"`benchmarks/probe_convergence.py --preset {args.preset} {' '.join(args.overrides)}` "
             f"({platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}); "
             f"each feature times 1 + 1e-7 x N(0, 1), {args.perturbations} times",
             "", "| probe | solver | accuracy | over perturbations | distinct | iterations | s per fit |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for key in sorted(k for k in train if k[:2] in ("h_", "z_") and k in test):
        train_X, test_X = train[key].double().numpy(), test[key].double().numpy()
        noise = [(1 + rng.standard_normal(train_X.shape) * 1e-7, 1 + rng.standard_normal(test_X.shape) * 1e-7)
                 for _ in range(args.perturbations)]
        for label, tol, max_iter in settings:
            acc, iters, seconds = _probe(train_X, train["label"], test_X, test["label"], tol=tol, max_iter=max_iter)
            accs = [_probe(train_X * a, train["label"], test_X * b, test["label"], tol=tol, max_iter=max_iter)[0]
                    for a, b in noise]
            lines.append(f"| {key} | {label} | {acc:.3f} | {min(accs):.3f}-{max(accs):.3f} | "
                         f"{len(set(accs))} | {iters} | {seconds:.2f} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if args.record:
        results.record("Probe convergence: last-bit changes of the features against the probe's tolerance",
                       f"{time.strftime('%Y-%m-%d')}, commit {results.commit()}: {text}")


if __name__ == "__main__":
    main()
