"""Command line.

    python -m dlx demo [--out dlx-demo]     the cutoff study on the embedded model (resumable)
    python -m dlx demo --record [...]       record one run and print its per-step table
    python -m dlx sweep spec.yaml [--out DIR] [--device cuda]   a sweep from a YAML spec
    accelerate launch -m dlx sweep spec.yaml                     the same, sharded over processes

Argument errors are one line, before any model work (exit 2), as are a damaged store and a full
disk. A sweep or study with a failed row or a failed metric value prints each ``SweepWarning`` and
the first error on stderr and exits 1 (rerun the same command to retry what failed).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _ratios(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None


def _fail(parser, msg: str) -> int:
    print(f"{parser.prog}: error: {msg}", file=sys.stderr)
    return 2


def _check_record_args(args) -> str | None:
    # flags of the study that a single recorded run would silently ignore
    ignored = [flag for flag, given in (("--seeds", args.seeds is not None), ("--cutoffs", args.cutoffs is not None),
                                        ("--device", args.device is not None), ("--dtype", args.dtype is not None))
               if given]
    if ignored:
        return (f"argument{'s' if len(ignored) > 1 else ''} {', '.join(ignored)}: not used by --record (one run of the embedded or tiny model on "
                f"the CPU); use --seed, --cutoff, or drop --record for the study")
    if args.model not in ("auto", "shapes", "tiny"):
        return (f"argument --model: --record runs 'auto', 'shapes' (the embedded model) or 'tiny'; got "
                f"{args.model!r} (the study without --record runs your model)")
    if args.prompt is not None and not args.prompt.strip():
        return f"argument --prompt must not be empty; got {args.prompt!r}"
    if args.steps < 1:
        return f"argument --steps must be at least 1; got {args.steps}"
    if args.guidance_scale is not None and (not math.isfinite(args.guidance_scale) or args.guidance_scale < 0):
        return f"argument --guidance-scale must be a finite number >= 0; got {args.guidance_scale}"
    if args.cutoff is not None and not (0.0 <= args.cutoff <= 1.0):
        return f"argument --cutoff must be a ratio in [0, 1]; got {args.cutoff}"
    return None


def _check_values(args) -> str | None:
    """Values that are wrong whatever the mode: a device this machine lacks, a dtype that is not
    one, a seed no generator takes."""
    from dlx import _args
    from dlx.errors import DlxError

    try:
        _args.seed("--seed", args.seed)
        if args.device is not None:
            _args.available_device("--device", args.device)
        if args.dtype is not None:
            _args.float_dtype("--dtype", args.dtype)
    except DlxError as e:
        return re.sub(r"`(--[\w-]+)`", r"\1", str(e))
    return None


def _record(args, parser) -> int:
    from pathlib import Path

    from dlx.errors import DlxError

    err = _check_record_args(args)
    if err:
        return _fail(parser, err)
    out = None
    if args.out is not None:
        from dlx.sweeps.store import check_out

        try:
            out = check_out(args.out, images=False)
        except DlxError as e:
            return _fail(parser, _cli_names(str(e)))
    import torch

    import dlx
    from dlx.demo import demo_pipeline

    try:
        pipe, kwargs, label = demo_pipeline(model=args.model, steps=args.steps, seed=args.seed,
                                            prompt=args.prompt, guidance_scale=args.guidance_scale)
    except DlxError as e:
        return _fail(parser, _cli_names(str(e)))
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
    if out is not None:
        try:
            path = trace.save(Path(out) / "trace.safetensors")
        except OSError as e:
            return _fail(parser, _os_error(e, Path(out) / "trace.safetensors"))
        print(f"trace written to {path}")
    return 0


def _os_error(e: OSError, where) -> str:
    """One line for a file-system error while writing outputs (a full disk above all)."""
    from dlx.sweeps.store import disk_full, is_disk_full

    if is_disk_full(e):
        return str(disk_full(where, e))
    return f"cannot write {str(getattr(e, 'filename', None) or where)!r}: {e.strerror or e}"


def _incomplete(parser, res, caught) -> int:
    """Print the sweep's warnings (failed rows, failed metrics: ``SweepWarning``) one line each on
    stderr, and the first failed row's error; 1 when the results are incomplete, else 0. Other
    warnings are shown as Python shows them."""
    import warnings

    from dlx.sweeps import SweepWarning

    ours = [w for w in caught if issubclass(w.category, SweepWarning)]
    for w in caught:
        if w not in ours:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    for w in ours:
        print(f"{parser.prog}: warning: {w.message}", file=sys.stderr)
    f = res.frame
    failed = f[f.status != "ok"]
    if len(failed):
        print(f"{parser.prog}: error: {len(failed)} of {len(f)} rows failed; first error: {failed.error.iloc[0]}",
              file=sys.stderr)
    return 1 if ours or len(failed) else 0


def _cli_names(msg: str) -> str:
    """A library error's argument names as the command line spells them."""
    for name in ("out", "device", "dtype", "cutoffs", "seeds", "steps", "prompt", "model"):
        msg = msg.replace(f"argument `{name}`", f"argument --{name}")
    return msg


def _demo(args, parser) -> int:
    if args.record:
        return _record(args, parser)
    from dlx.errors import DlxError

    t0 = time.perf_counter()
    prompts = [args.prompt] if args.prompt is not None else None
    from dlx.demo import is_user_model

    user = is_user_model(args.model)
    if (args.device is not None or args.dtype is not None) and not user:
        given = [f for f, v in (("--device", args.device), ("--dtype", args.dtype)) if v is not None]
        return _fail(parser, f"argument {', '.join(given)}: goes with --model PATH_OR_ID (your model); "
                             f"the embedded model runs on the CPU in float32")
    if args.model == "tiny":
        return _fail(parser, "argument --model: the study runs on the embedded model ('shapes' or 'auto'); "
                             "use --record for the tiny pipeline")
    if args.cutoff is not None:
        return _fail(parser, "argument --cutoff belongs to --record; the study takes --cutoffs 0,0.5,1")
    from dlx.demo import STUDY_CUTOFFS, STUDY_PROMPTS, check_study_args, format_summary, study, write_outputs
    from dlx.sweeps.store import check_out

    if args.seeds is None:
        args.seeds = 4
    try:
        check_study_args(prompts=prompts or STUDY_PROMPTS, seeds=args.seeds, seed=args.seed, steps=args.steps,
                         guidance_scale=args.guidance_scale,
                         cutoffs=args.cutoffs if args.cutoffs is not None else STUDY_CUTOFFS,
                         model=args.model)
        out = check_out(args.out)
    except DlxError as e:
        return _fail(parser, _cli_names(str(e)))
    import torch

    import dlx

    from dlx.demo import USER_PROMPTS

    pairs = len(prompts or (USER_PROMPTS if user else STUDY_PROMPTS)) * args.seeds
    ncut = len(args.cutoffs if args.cutoffs is not None else STUDY_CUTOFFS)
    print(f"dlx {dlx.__version__} · torch {torch.__version__} ({torch.get_num_threads()} threads) · "
          f"cutoff study on {args.model if user else 'the embedded shapes model'}: {ncut} cutoffs x {pairs} "
          f"(prompt, seed) pairs, "
          f"{args.steps} steps -> {out}")
    import warnings

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", dlx.sweeps.SweepWarning)  # others as Python's filters say
            res = study(out, prompts=prompts, seeds=args.seeds, seed=args.seed, steps=args.steps,
                        guidance_scale=args.guidance_scale, cutoffs=args.cutoffs, progress=not args.quiet,
                        **(dict(model=args.model, device=args.device, dtype=args.dtype) if user else {}))
        print(format_summary(res))
        files = write_outputs(res, out)
    except DlxError as e:
        return _fail(parser, _cli_names(str(e)))
    except OSError as e:
        return _fail(parser, _os_error(e, out))
    print("wrote " + ", ".join(str(p) for p in [out / "sweep.sqlite", *files.values()]))
    print(f"done in {time.perf_counter() - t0:.1f} s (after start-up); rerun the same command to resume or reread")
    return _incomplete(parser, res, caught)


def _sweep(args, parser) -> int:
    import warnings

    from dlx.errors import DlxError
    from dlx.sweeps import SweepWarning
    from dlx.sweeps.shard import ranks
    from dlx.sweeps.yaml_spec import run_yaml

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SweepWarning)  # others as Python's filters say
            res = run_yaml(args.spec, out=args.out, device=args.device, progress=not args.quiet)
        if not ranks().main:
            return 0
        import pandas as pd

        with pd.option_context("display.width", 200, "display.max_columns", 40, "display.precision", 4):
            print(res.summary().to_string(index=False))
        res.frame.to_csv(res.out / "results.csv", index=False)
    except DlxError as e:
        return _fail(parser, str(e))
    except OSError as e:
        return _fail(parser, _os_error(e, args.out or args.spec))
    print(f"results in {res.out}")
    return _incomplete(parser, res, caught)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlx", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="the CFG cutoff study on the embedded model (--record: one recorded run)")
    demo.add_argument("--out", default=None, help="output folder (default dlx-demo/; with --record: no file)")
    demo.add_argument("--model", default="auto",
                      help="'auto' or 'shapes' (the embedded model), 'tiny' (--record only), or a pipeline "
                           "folder saved with save_pretrained / a hub id (the study on your model)")
    demo.add_argument("--device", default=None, help="torch device for --model PATH_OR_ID, e.g. cuda")
    demo.add_argument("--dtype", default=None, help="dtype for --model PATH_OR_ID, e.g. float16")
    demo.add_argument("--prompt", default=None,
                      help="one caption (of the embedded model's language, unless --model names your model)")
    demo.add_argument("--steps", type=int, default=None, help="denoising steps (study: 20, --record: 25)")
    demo.add_argument("--seed", type=int, default=0, help="first seed")
    demo.add_argument("--seeds", type=int, default=None, help="seeds per prompt in the study (default 4)")
    demo.add_argument("--guidance-scale", type=_float, default=None)
    demo.add_argument("--cutoffs", type=_ratios, default=None, help="study ratios, e.g. 0,0.2,0.4,0.6,0.8,1")
    demo.add_argument("--cutoff", type=_float, default=None, help="--record: CFG cutoff ratio in [0, 1]")
    demo.add_argument("--record", action="store_true", help="record one run and print its per-step table")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    sw = sub.add_parser("sweep", help="run a sweep from a YAML spec (accelerate launch -m dlx sweep: sharded)")
    sw.add_argument("spec", help="the YAML spec file")
    sw.add_argument("--out", default=None, help="output folder (overrides the spec's `out`)")
    sw.add_argument("--device", default=None, help="torch device, e.g. cuda or cpu")
    sw.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "sweep":
        return _sweep(args, sw)
    err = _check_values(args)
    if err:
        return _fail(demo, err)
    if args.steps is None:
        args.steps = 25 if args.record else 20
    if args.out is None and not args.record:
        args.out = "dlx-demo"
    return _demo(args, demo)


if __name__ == "__main__":
    sys.exit(main())
