"""What each format of the menu costs in the variant pass: one pass of `luq quantize`'s
variant stage (the layer_pass stage of `luq.Session.measure`, full-precision Hessians and the
entropy ranking, as the budget mode runs it) over every decoder linear, in every format of the
default menu plus --extra, with a fresh variant cache; per format the solver seconds summed over
the linears, and the pass's own work (forwards, Hessians, entropy) as the rest of its wall time
(the stage's seconds, from `on_stage`). `measure` then prices every format on one sensitivity
window, untimed and unused here.

    python -m bench.menu_cost [--model smollm2] [--extra billm-k5g64r,billm-k8g64,billm-k16g64]

Issue 13 bounds the budget mode's measuring at 2x the old variant pass (GPTQ-4 + BiLLM); the
table prints each menu's pass against that pass, all from this one run (the formats' solves
alternate layer by layer, so load on the machine falls on every format alike).
Writes --out (default bench/results/menu_cost-<model>.json).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from bench.common import add_model_args, calibration_of
from luq.config import LUQConfig
from luq.models import UNIT_KINDS
from luq.quant import DEFAULT_MENU, parse_formats
from luq.session import Session

RESULTS = Path(__file__).parent / "results"
OLD_PASS = ("gptq4-g128", "billm")   # the variant pass before the budget mode


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--extra", default="billm-k5g64r,billm-k8g64,billm-k16g64",
                   help="formats timed beside the default menu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    extra = [f for f in parse_formats(args.extra) if f not in DEFAULT_MENU]
    names = list(DEFAULT_MENU) + [f for f in OLD_PASS + tuple(extra) if f not in DEFAULT_MENU]
    calibration = calibration_of(args)
    # the decoder's linears only (no units outside it), as the variant pass of before the budget mode;
    # one sensitivity window: measure's costs are not used here
    config = LUQConfig(calibration=calibration, budget_gb=1.0, formats=tuple(names), kmeans_clusters=args.k,
                       keep=UNIT_KINDS, sensitivity_samples=1)
    walls: dict[str, float] = {}

    def on_stage(stage: str, seconds: float | None) -> None:
        if seconds is not None:
            walls[stage] = walls.get(stage, 0.0) + seconds

    with tempfile.TemporaryDirectory() as tmp:   # a fresh variant cache: every format is solved in this run
        session = Session(args.model, config, device="cpu", dtype=torch.float32, cache_dir=tmp, stream=False,
                          on_stage=on_stage)
        passed = session.measure().passed
    wall = walls["layer_pass"]
    solve = {n: 0.0 for n in names}
    for layer in passed.layers:
        for name, seconds in layer.seconds.items():
            solve[name] += seconds
    shared = wall - sum(solve.values())

    def menu_pass(menu) -> float:
        return shared + sum(solve[n] for n in menu)

    old = menu_pass(OLD_PASS)
    menus = {"old pass (GPTQ-4 g128 + BiLLM)": OLD_PASS, "default menu (12 GPTQ)": DEFAULT_MENU}
    for f in extra:
        menus[f"default + {f}"] = tuple(DEFAULT_MENU) + (f,)
    if len(extra) > 1:
        menus[f"default + {' + '.join(extra)}"] = tuple(DEFAULT_MENU) + tuple(extra)
    print(f"{args.model}, {calibration.samples} x {calibration.seq_len} tokens, {args.threads} threads: pass wall "
          f"{wall:.0f} s, of which solves {sum(solve.values()):.0f} s, the rest (forwards, Hessians, entropy) "
          f"{shared:.0f} s\n")
    print("| format | solver s (all linears) | / GPTQ-4 g128 |\n|---|---:|---:|")
    for n in names:
        print(f"| {n} | {solve[n]:.1f} | {solve[n] / solve['gptq4-g128']:.2f} |")
    print("\n| menu | variant pass s | / old pass |\n|---|---:|---:|")
    for label, menu in menus.items():
        print(f"| {label} | {menu_pass(menu):.0f} | {menu_pass(menu) / old:.2f} |")
    out = args.out or RESULTS / f"menu_cost-{args.model}.json"
    out.write_text(json.dumps({"model": args.model, "samples": calibration.samples, "seq_len": calibration.seq_len,
                               "threads": args.threads, "torch": torch.__version__, "wall_s": wall,
                               "shared_s": shared, "solver_s": solve,
                               "menus": {k: {"formats": list(v), "pass_s": menu_pass(v), "vs_old": menu_pass(v) / old}
                                         for k, v in menus.items()}}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
