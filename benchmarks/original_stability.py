"""Learning-rate stability of the original network, measured with the original probe's protocol.

For each learning rate and normalization off/on, a fresh :class:`~iceaggr.original.OriginalModel`
(same seed for every cell) trains on the same batches with the protocol of DESIGN.md section 7:
AdamW(lr, weight_decay 1e-5) on all parameters, constant learning rate, batches of 256 events
taken in file order (an unshuffled loader), ``clip_grad_norm_(1.0)`` after the gradient norms are
recorded, angular-distance loss. Per cell it prints:

- ``held-out``: change of the loss on one fixed held-out batch (the last ``--batch-size`` events
  of the last file, never trained on) from before the first step to after the last;
- ``train last-first``: last minus first training-batch loss (the original's "Loss");
- ``max global``: the largest pre-clip global gradient norm;
- ``max param``: the largest per-parameter pre-clip gradient norm, its parameter and step;
- ``first layer``: the largest per-parameter norm on ``t1.input_projection`` or ``t1.layers.0``;
- ``explodes``: the step of the first non-finite loss, prediction or gradient (the cell stops).

Training batches are the first ``steps * batch_size`` events of the folder in file order, so the
folder needs ``(steps + 1) * batch_size`` events. Nothing here is hard-coded: every number is
measured in the run.

Run from the repository root::

    iceaggr synth --out /tmp/synth6k --events 6000 --batch-size 2000
    python benchmarks/original_stability.py --data /tmp/synth6k
    python benchmarks/original_stability.py --data /tmp/synth6k --lrs 1e-3 --seeds 0 1 2 --raw-only
    python benchmarks/original_stability.py --data /tmp/synth6k --d-model 32 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from iceaggr.batch import DomBatch
from iceaggr.dataset import KaggleDataset
from iceaggr.loader import EventLoader, Truncation, assemble_batch
from iceaggr.losses import angular_distance
from iceaggr.model import ModelConfig, build_model

FIRST_LAYER_PREFIXES = ("t1.input_projection.", "t1.layers.0.")


@dataclass
class CellResult:
    lr: float
    normalize: bool
    seed: int
    heldout_initial: float
    heldout_change: float | None
    train_last_minus_first: float | None
    max_global_norm: float
    max_param_norm: float
    max_param_name: str
    max_param_step: int
    max_first_layer_norm: float
    explodes_at_step: int | None
    seconds: float


def load_batches(data: Path, steps: int, batch_size: int) -> tuple[list[DomBatch], DomBatch]:
    """The first ``steps`` batches in file order and a held-out batch (the last events)."""
    ds = KaggleDataset(data)
    need = (steps + 1) * batch_size
    loader = EventLoader(
        dataset=ds,
        batch_ids=ds.batch_ids,
        batch_size=batch_size,
        shuffle=False,
        prefetch=0,
        max_events=steps * batch_size,
    )
    total = sum(ds.num_events(b) for b in ds.batch_ids)
    if total < need:
        sys.exit(
            f"{data} holds {total} events; --steps {steps} at --batch-size {batch_size} "
            f"needs {need} (training batches + a disjoint held-out batch)"
        )
    train = list(loader.iter_epoch(0))
    last = ds.batch_ids[-1]
    n_last = ds.num_events(last)
    heldout = assemble_batch(
        ds.read_batch(last), np.arange(n_last - batch_size, n_last), ds.geometry, Truncation()
    )
    return train, heldout


def _loss(model: torch.nn.Module, batch: DomBatch) -> torch.Tensor:
    out = model(batch)
    return angular_distance(out.direction, batch.direction).mean()


def run_cell(
    model_cfg: ModelConfig,
    lr: float,
    seed: int,
    train: list[DomBatch],
    heldout: DomBatch,
) -> CellResult:
    """One cell of the table: a fresh model, ``len(train)`` steps."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = build_model(model_cfg)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=1e-5)
    model.eval()
    with torch.no_grad():
        initial = float(_loss(model, heldout))
    model.train()
    losses: list[float] = []
    max_global, max_param, max_name, max_step, first_layer = 0.0, 0.0, "", 0, 0.0
    explodes = None
    for step, batch in enumerate(train, start=1):
        out = model(batch)
        loss = angular_distance(out.direction, batch.direction).mean()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        norms = torch.stack(torch._foreach_norm([p.grad for p in params])).tolist()
        total = math.sqrt(sum(n * n for n in norms))
        if not (
            math.isfinite(loss.item())
            and torch.isfinite(out.direction).all()
            and math.isfinite(total)
        ):
            explodes = step
            break
        losses.append(loss.item())
        max_global = max(max_global, total)
        i = int(np.argmax(norms))
        if norms[i] > max_param:
            max_param, max_name, max_step = norms[i], names[i], step
        first_layer = max(
            first_layer,
            max(
                n
                for n, name in zip(norms, names, strict=False)
                if name.startswith(FIRST_LAYER_PREFIXES)
            ),
        )
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
    change = None
    if explodes is None:
        model.eval()
        with torch.no_grad():
            final = float(_loss(model, heldout))
        change = final - initial if math.isfinite(final) else None
    return CellResult(
        lr=lr,
        normalize=model_cfg.normalize,
        seed=seed,
        heldout_initial=initial,
        heldout_change=change,
        train_last_minus_first=losses[-1] - losses[0] if explodes is None else None,
        max_global_norm=max_global,
        max_param_norm=max_param,
        max_param_name=max_name,
        max_param_step=max_step,
        max_first_layer_norm=first_layer,
        explodes_at_step=explodes,
        seconds=time.perf_counter() - t0,
    )


def fmt(x: float | None, spec: str = "+.3f") -> str:
    return "—" if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="Kaggle-layout folder")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 3e-5, 1e-4, 3e-4, 1e-3])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--raw-only", action="store_true", help="only normalize=false")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", type=Path, help="write the cells here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train, heldout = load_batches(args.data, args.steps, args.batch_size)
    print(
        f"{len(train)} training batches of {args.batch_size}; held-out batch of "
        f"{heldout.num_events} events; d_model {args.d_model}"
    )
    print(
        "| lr | normalize | seed | held-out Δ | train last-first | max global | max param "
        "(name @ step) | first layer | explodes | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    cells = []
    for seed in args.seeds:
        for lr in args.lrs:
            for normalize in (False,) if args.raw_only else (False, True):
                cfg = ModelConfig(arch="original", d_model=args.d_model, normalize=normalize)
                c = run_cell(cfg, lr, seed, train, heldout)
                cells.append(c)
                print(
                    f"| {lr:.0e} | {normalize} | {seed} | {fmt(c.heldout_change)} | "
                    f"{fmt(c.train_last_minus_first)} | {c.max_global_norm:.3g} | "
                    f"{c.max_param_norm:.3g} ({c.max_param_name} @ {c.max_param_step}) | "
                    f"{c.max_first_layer_norm:.3g} | {c.explodes_at_step or '—'} | "
                    f"{c.seconds:.0f} |",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps([asdict(c) for c in cells], indent=2))


if __name__ == "__main__":
    main()
