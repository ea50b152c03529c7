"""``python -m dlx demo``: the cutoff study on the embedded model, and the single-run recording.

The study sweeps CFG cutoff ratios over (prompt, seed) pairs of the embedded shapes model and
writes what a researcher needs to decide how much guidance to keep: the summary (adherence,
fidelity to full guidance, NFE, predicted standalone wall time and its timing regime),
``results.csv`` (one row per run), ``speed_quality.png``, ``report.html`` (``dlx.report``: one
self-contained page to open or send) and the SQLite store. Rerunning with the
same folder resumes (nothing is recomputed once finished).
"""

from __future__ import annotations

import math
from pathlib import Path

from .errors import DlxError

DEMO_PROMPT = "a red circle and a blue square"
#: the study's prompts: placed captions, where the model needs guidance most (see the model card)
STUDY_PROMPTS = [
    "a red circle on the left and a blue square on the right",
    "a green star on the top and a yellow heart on the bottom",
    "a purple triangle on the right and a cyan cross on the left",
    "a yellow diamond on the bottom and a red ring on the top",
]
STUDY_CUTOFFS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
#: the study's prompts on a user's model (``--model PATH_OR_ID``), where any caption goes
USER_PROMPTS = [
    "a photo of a red apple on a wooden table",
    "a watercolor painting of a lighthouse at dusk",
    "a portrait of an astronaut, studio lighting",
    "an isometric illustration of a small city",
]
USER_GUIDANCE_SCALE = 7.5


def is_user_model(model: str) -> bool:
    """Whether ``--model`` names a user's model (a saved pipeline folder or a hub id)."""
    return model not in ("auto", "shapes", "tiny")


def _shapes_available() -> bool:
    from . import zoo

    return (zoo.path("shapes") / "model_index.json").is_file()


def demo_pipeline(model: str = "auto", steps: int = 25, seed: int = 0, prompt=None, guidance_scale=None):
    """(pipeline, call kwargs, label) for the single-run demo; ``model`` is 'auto', 'shapes' or 'tiny'."""
    import torch

    if model not in ("auto", "shapes", "tiny"):
        raise DlxError(f"argument `model` must be 'auto', 'shapes' or 'tiny'; got {model!r}")
    if model == "shapes" or (model == "auto" and _shapes_available()):
        from . import zoo

        info = zoo.info("shapes")
        pipe = zoo.load("shapes", device="cpu", dtype=torch.float32)
        kwargs = dict(
            prompt=prompt or DEMO_PROMPT,
            num_inference_steps=steps,
            guidance_scale=guidance_scale if guidance_scale is not None else info["recommended_guidance_scale"],
            generator=torch.Generator().manual_seed(seed),
        )
        return pipe, kwargs, "embedded shapes model (dlx.zoo)"
    from .testing import example_inputs, tiny_pipeline

    pipe = tiny_pipeline("sd", seed=seed)
    kwargs = example_inputs("sd", steps=steps, seed=seed, prompt=prompt or "a red circle",
                            guidance_scale=guidance_scale if guidance_scale is not None else 5.0)
    return pipe, kwargs, "tiny random-weight SD pipeline (dlx.testing)"


def check_study_args(*, prompts, seeds: int, seed: int, steps: int, guidance_scale, cutoffs,
                     model: str = "shapes") -> None:
    """Every argument of the study, checked before any model work (DlxError naming it)."""
    from .zoo.shapes_data import parse

    if is_user_model(model):
        from .sweeps.model import _check_model

        _check_model(model, "--model")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise DlxError(f"argument --prompt must be a non-empty caption; got {p!r}")
        if is_user_model(model):
            continue
        try:
            parse(p)
        except DlxError:
            raise DlxError(f"argument --prompt: {p!r} is not a caption of the embedded model's language "
                           f"(e.g. {STUDY_PROMPTS[0]!r}; see dlx.zoo.info('shapes'))") from None
    if seeds < 1:
        raise DlxError(f"argument --seeds must be at least 1; got {seeds}")
    if seed < 0:
        raise DlxError(f"argument --seed must be >= 0; got {seed}")
    from ._args import SEED_LIMIT

    if seed >= SEED_LIMIT:
        raise DlxError(f"argument --seed must be below 2**63 (torch generators and SQLite take signed 64-bit "
                       f"seeds); got {seed}")
    if seed + seeds > SEED_LIMIT:
        raise DlxError(f"arguments --seed and --seeds: seeds {seed} to {seed + seeds - 1} reach past 2**63 - 1; "
                       f"give a smaller --seed")
    if len(prompts) * seeds < 1:
        raise DlxError("the study needs at least one (prompt, seed) pair")
    if steps < 1:
        raise DlxError(f"argument --steps must be at least 1; got {steps}")
    if guidance_scale is not None and (not math.isfinite(guidance_scale) or guidance_scale <= 1):
        raise DlxError(f"argument --guidance-scale must be a finite number > 1 (a cutoff study needs CFG); "
                       f"got {guidance_scale}")
    for r in cutoffs:
        if not (0.0 <= r <= 1.0):
            raise DlxError(f"argument --cutoffs: ratios must be in [0, 1]; got {r}")
    if not cutoffs:
        raise DlxError("argument --cutoffs must hold at least one ratio")


def study(out, *, prompts=None, seeds: int = 4, seed: int = 0, steps: int = 25, guidance_scale=None,
          cutoffs=None, progress: bool = True, timing_repeats: int = 2, model: str = "shapes", device=None,
          dtype=None):
    """Run (or resume) the cutoff study into ``out``; returns the SweepResult.

    ``model`` is the embedded model (``"shapes"``, judged by adherence, PSNR and SSIM) or a user's
    model: a folder saved with ``save_pretrained`` or a hub id (judged by PSNR and SSIM against
    full guidance), loaded on ``device`` in ``dtype`` only when rows are missing.
    """
    from . import zoo
    from .sweeps import sweep

    if is_user_model(model):
        scale = guidance_scale if guidance_scale is not None else USER_GUIDANCE_SCALE
        return sweep(model, prompts=list(prompts or USER_PROMPTS), seeds=range(seed, seed + seeds),
                     cutoffs=list(cutoffs if cutoffs is not None else STUDY_CUTOFFS), metrics=["psnr", "ssim"],
                     out=out, num_inference_steps=steps, guidance_scale=scale, timing=("eager",),
                     timing_repeats=timing_repeats, progress=progress, device=device, dtype=dtype)
    scale = guidance_scale if guidance_scale is not None else zoo.info("shapes")["recommended_guidance_scale"]
    return sweep("shapes", prompts=list(prompts or STUDY_PROMPTS), seeds=range(seed, seed + seeds),
                 cutoffs=list(cutoffs if cutoffs is not None else STUDY_CUTOFFS),
                 metrics=["adherence", "psnr", "ssim"], out=out, num_inference_steps=steps, guidance_scale=scale,
                 timing=("eager",), timing_repeats=timing_repeats, progress=progress, device=device, dtype=dtype, keep_previews=True)


def write_outputs(res, out) -> dict:
    """The study's files beside the store: results.csv, summary.csv, speed_quality.png, report.html."""
    out = Path(out)
    files = {}
    res.frame.to_csv(out / "results.csv", index=False)
    files["results"] = out / "results.csv"
    summary = res.summary()
    summary.to_csv(out / "summary.csv", index=False)
    files["summary"] = out / "summary.csv"
    fig, _ = res.plot(metric="adherence" if "adherence" in res.metrics else None)
    fig.savefig(out / "speed_quality.png", dpi=120)
    files["plot"] = out / "speed_quality.png"
    files["report"] = _report(res, out)
    return files


def _report(res, out: Path):
    """report.html: the study in one self-contained page (``dlx.report``: tables, plots, images)."""
    from . import report

    title = ("CFG cutoff study on the embedded shapes model" if "adherence" in res.metrics
             else "CFG cutoff study")
    return report.report(res, out / "report.html", title=title)


def format_summary(res) -> str:
    """The study as text, the answer first: the recommendation (``res.recommend()``), then per
    config NFE, predicted standalone time and its share of full guidance's with its interval
    (``*``: the timing never settled), adherence with its Wilson interval and its paired
    difference to full guidance, PSNR and SSIM against full guidance (the reference itself reads
    "reference"), the intervals' methods, the timing model, and how the sweep compared to a loop."""
    s = res.summary()
    has_adh = "adherence" in s.columns
    has_ps, has_ss = "psnr" in s.columns, "ssim" in s.columns
    cmp = res.compare(metrics=["adherence"]).set_index("config") if has_adh else None
    lines = []
    try:
        lines += [f"Recommendation: {res.recommend()}", ""]
    except DlxError as e:  # no metric with a default margin: the table still says everything
        lines += [f"Recommendation: none ({e})", ""]
    head = f"{'config':<12} {'NFE':>5} {'time alone':>10}  {'vs full (95% CI)':<19}"
    if has_adh:
        head += f"  {'adherence (95% CI)':<20}  {'vs full (95% CI)':<22}"
    if has_ps:
        head += f"  {'PSNR dB (95% CI)':<19}"
    if has_ss:
        head += f"  {'SSIM':>9}"
    lines += [head, "-" * len(head)]
    unsettled = False
    for r in s.itertuples():
        t = getattr(r, "time_eager_s", math.nan)
        share = getattr(r, "time_eager_vs_full", math.nan)
        lo, hi = getattr(r, "time_eager_vs_full_lo", math.nan), getattr(r, "time_eager_vs_full_hi", math.nan)
        mark = "*" if getattr(r, "timing_steady_eager", None) is False else ""
        unsettled |= bool(mark)
        vs = (f"{share:.2f} [{lo:.2f}, {hi:.2f}]" if lo == lo else f"{share:.2f}") + mark
        line = f"{r.config:<12} {r.nfe:5.1f} {t:9.3f}s  {vs:<19}"
        if has_adh:
            adh = f"{r.adherence:6.1%} [{r.adherence_lo:.0%}, {r.adherence_hi:.0%}]"
            c = cmp.loc[r.config]
            d = ("reference" if c.is_reference else
                 f"{c.adherence_diff:+.0%} [{c.adherence_diff_lo:+.0%}, {c.adherence_diff_hi:+.0%}]")
            line += f"  {adh:<20}  {d:<22}"
        if has_ps:
            ps = "reference (∞)" if r.is_reference else f"{r.psnr:5.1f} [{r.psnr_lo:.1f}, {r.psnr_hi:.1f}]"
            line += f"  {ps:<19}"
        if has_ss:
            line += f"  {'reference' if r.is_reference else f'{r.ssim:.3f}':>9}"
        lines.append(line)
    if unsettled:
        lines.append("* the timing never settled (the host's speed changed while it was measured): this share is "
                     "uncertain beyond its interval")
    methods = s.attrs.get("interval_method", {})
    lines.append("intervals: " + "; ".join(f"{m}: {v}" for m, v in methods.items())
                 + (f"; adherence vs full: {cmp.attrs['method']['adherence']}" if has_adh else "")
                 + f"; time share: {s.attrs.get('time_interval_method', '')}")
    cost = next(iter(res.costs("eager").values()), None)
    if cost is not None:
        lines.append("")
        n_pairs, between = cost.get("pairs", cost["repeats"]), cost.get("sweep_pairs", 0)
        lines.append(f"timing ({cost['device_name']}, eager, batch {cost['batch']}, medians of {n_pairs} interleaved "
                     f"pairs of runs, {between} of them between the sweep's batches): guided step {cost['guided_step_ms']:.1f} ms, unguided "
                     f"{cost['unguided_step_ms']:.1f} ms, fixed {cost['fixed_ms']:.0f} ms -> {cost['regime']}: "
                     f"an unguided step saves {100 * cost['saving']:.0f}%")
        if cost.get("steady") is False:
            lines.append(f"the host's speed was still changing while these were measured ({100 * cost['drift']:.0f}% "
                         f"between the older and newer calls): the times alone are uncertain by about that")
        lines.append("'time alone' is the predicted wall time of one such run by itself (measured costs, not "
                     "the sweep's clock), 'vs full' the same as a share of full guidance's: the host's speed, "
                     "which moves the first, cancels in the second; PSNR/SSIM compare with full guidance "
                     f"({' / '.join(dict.fromkeys(s.attrs['reference'].values()))}) of the same prompt and seed.")
    f = res.frame
    batches = [e for e in res.events if e["kind"] == "batch"]
    if batches:
        ev = sum(e["evaluations"] for e in batches)
        loop = f.nfe.sum()
        lines.append(f"the sweep ran {len(f)} rows in {len(batches)} pipeline call(s), {sum(e['call_ms'] for e in batches) / 1e3:.1f} s "
                     f"of calls; a loop of standalone runs would take ~{f.time_eager_s.sum():.0f} s (predicted) and "
                     f"{loop:.0f} denoiser evaluations against the sweep's {ev:.0f}")
    return "\n".join(lines)
