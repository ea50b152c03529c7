"""Command line: ``python -m dlx demo`` records a run and prints its per-step table."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    import torch

    import dlx
    from dlx.demo import demo_pipeline

    pipe, kwargs, label = demo_pipeline(model=args.model, steps=args.steps, seed=args.seed,
                                                    prompt=args.prompt, guidance_scale=args.guidance_scale)
    print(f"dlx {dlx.__version__} · torch {torch.__version__} · model: {label}")
    parts = [dlx.CFGCutoff(ratio=args.cutoff)] if args.cutoff is not None else []
    with dlx.record(pipe, *parts) as trace:
        pipe(**kwargs)
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.precision", 4):
        print(trace.to_frame().drop(columns=["timestep"]).to_string(index=False))
    print(trace)
    t = trace.timing()
    if t["regime"] != "unknown":
        print(f"timing ({t['timer']}): guided step {t['guided_ms']:.1f} ms, unguided {t['unguided_ms']:.1f} ms "
              f"-> {t['regime']}, an unguided step saves {100 * t['saving']:.0f}%")
    if args.out:
        path = trace.save(args.out)
        print(f"trace written to {path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlx", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="record one run (embedded shapes model if shipped, else a tiny pipeline)")
    demo.add_argument("--model", default="auto", help="'shapes', 'tiny' or 'auto' (default)")
    demo.add_argument("--prompt", default=None)
    demo.add_argument("--steps", type=int, default=25)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--guidance-scale", type=float, default=None)
    demo.add_argument("--cutoff", type=float, default=None, help="CFG cutoff ratio in [0, 1]")
    demo.add_argument("--out", default=None, help="save the trace to this .safetensors file")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return _demo(args)


if __name__ == "__main__":
    sys.exit(main())
