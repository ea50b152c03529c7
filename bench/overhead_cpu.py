"""dlx's own per-step host cost, on CPU: the Python and small kernels dlx adds to each step.

A tiny SD pipeline (``dlx.testing.tiny_pipeline("sd")``, 4x16x16 latents) runs many steps with
CFG. Its UNet's ``forward`` is replaced by a stub of two small kernels (an instance attribute, which
dlx's tap wraps and restores like any forward), so the loop costs what a CUDA-graph UNet costs the
host: little, and dlx's own Python and kernels show. ``--real-unet`` keeps the tiny UNet (~28 ms a
step on one CPU thread: dlx's cost drowns in its noise).
Variants run interleaved (one call of each per round, order rotated every round); the table gives
the median per-step time of each and what it adds over ``bare``, in µs per step:

  bare             the pipeline alone
  attach           ``dlx.attach(pipe)`` with no parts: session, chained callback and denoiser tap
  record           ``dlx.record(pipe)``: latents, embeddings, cond + uncond, x0, timing
  record-latents   ``dlx.record(pipe, keep=("latents",))``
  cutoff-0.5       ``dlx.attach(pipe, dlx.CFGCutoff(ratio=0.5))``: guided half, then the unguided tail
  official-cutoff-0.5  diffusers' ``SDCFGCutoffCallback(cutoff_step_ratio=0.5)``, the pipeline's own tail

``--profile`` also runs ``record`` under cProfile and prints the functions of dlx by own time.

Usage: PYTHONPATH=. python bench/overhead_cpu.py [--steps 50] [--rounds 15] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import statistics
import time

import torch
from _hookclock import HookClock

import dlx
from dlx.testing import example_inputs, tiny_pipeline


def stub_unet(pipe):
    """Replace the UNet's forward by a cheap, deterministic one (cond and uncond differ)."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    def forward(sample, timestep, encoder_hidden_states, *args, return_dict=True, **kwargs):
        pred = torch.addcmul(sample, sample, encoder_hidden_states[:, :1, :1].unsqueeze(-1), value=0.5)
        return (pred,) if not return_dict else UNet2DConditionOutput(sample=pred)

    object.__setattr__(pipe.unet, "forward", forward)


def variants(pipe, kw):
    def bare():
        pipe(**kw())

    def attach():
        with dlx.attach(pipe):
            pipe(**kw())

    def record():
        with dlx.record(pipe):
            pipe(**kw())

    def record_latents():
        with dlx.record(pipe, keep=("latents",)):
            pipe(**kw())

    def cutoff():
        with dlx.attach(pipe, dlx.CFGCutoff(ratio=0.5)):
            pipe(**kw())

    def official():
        from diffusers.callbacks import SDCFGCutoffCallback

        pipe(**kw(), callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5))

    return {"bare": bare, "attach": attach, "record": record, "record-latents": record_latents,
            "cutoff-0.5": cutoff, "official-cutoff-0.5": official}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--short", type=int, default=10, help="the short run (splits fixed and per-step cost)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="also profile `record` with cProfile")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--wall", action="store_true",
                    help="time wall clock (default: this process's CPU time, robust to other load on the machine)")
    ap.add_argument("--no-gc", action="store_true", help="collect before each call and keep the collector off during it")
    ap.add_argument("--real-unet", action="store_true", help="keep the tiny UNet (slow, noisy)")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    clock = time.perf_counter if args.wall else time.process_time
    pipe = tiny_pipeline("sd")
    if not args.real_unet:
        stub_unet(pipe)
    steps = args.steps
    hooks = HookClock()
    hook_us: dict = {}
    # Two run lengths split what dlx adds into a fixed cost per call and a marginal cost per step.
    lengths = (steps, args.short)
    vs = {L: variants(pipe, lambda L=L: example_inputs("sd", steps=L)) for L in lengths}
    names = list(vs[steps])
    for _ in range(args.warmup):
        for L in lengths:
            for f in vs[L].values():
                f()
    times = {(n, L): [] for n in names for L in lengths}  # ms per call
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for L in lengths:
            for n in order:
                if args.no_gc:
                    gc.collect()
                    gc.disable()
                hooks.take()
                t0 = clock()
                vs[L][n]()
                times[n, L].append((clock() - t0) * 1e3)
                gc.enable()
                if L == steps:
                    hook_us.setdefault(n, []).append(hooks.take() / steps * 1e6)

    def added(n, L):  # per-round differences to bare: robust to drifts of the machine
        return [(t - b) for t, b in zip(times[n, L], times["bare", L])]

    print(f"tiny sd ({'real' if args.real_unet else 'stub'} UNet), CFG, batch 1, {args.rounds} interleaved rounds, "
          f"torch {torch.__version__}, 1 thread, {'wall' if args.wall else 'process CPU'} time\ndlx from {dlx.__file__}")
    print(f"{'variant':<16}{'ms/call':>9}{'µs/step':>9}{'added µs/step':>15}{'IQR':>7}"
          f"{'per call µs':>13}{'per step µs':>13}{'in hooks µs/step':>18}")
    for n in names:
        d = added(n, steps)
        q = statistics.quantiles(d, n=4) if len(d) >= 2 else [0.0, 0.0, 0.0]
        a_long = statistics.median(d) * 1e3
        a_short = statistics.median(added(n, args.short)) * 1e3
        marginal = (a_long - a_short) / (steps - args.short)
        fixed = a_long - marginal * steps
        print(f"{n:<16}{statistics.median(times[n, steps]):>9.2f}{statistics.median(times[n, steps]) / steps * 1e3:>9.1f}"
              f"{a_long / steps:>15.1f}{(q[2] - q[0]) * 1e3 / steps:>7.1f}"
              f"{fixed:>13.0f}{marginal:>13.1f}{statistics.median(hook_us[n]):>18.1f}")
    print(f"added µs/step: median over rounds of (variant - bare) / {steps} steps, and its IQR (the whole call's "
          f"noise);\nper call / per step: fit of the added time at {args.short} and {steps} steps; in hooks: "
          f"wall time inside dlx (tap less the denoiser, step-end callback, attach's set-up and tear-down), "
          f"median per step")

    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(3):
            vs[steps]["record"]()
        prof.disable()
        s = io.StringIO()
        st = pstats.Stats(prof, stream=s)
        st.sort_stats("tottime")
        # only dlx's own functions (and torch calls made from them show as builtins in callers)
        st.print_stats(r"dlx[/\\]", args.top)
        print(s.getvalue())
        s = io.StringIO()
        st = pstats.Stats(prof, stream=s)
        st.sort_stats("cumulative")
        st.print_stats(r"dlx[/\\](session|_tap|recorder|families|trace)", args.top)
        print(s.getvalue())


if __name__ == "__main__":
    main()
