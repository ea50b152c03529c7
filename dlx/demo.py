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
        from .sweep.model import _check_model

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
    from .sweep import sweep

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
                 timing=("eager",), timing_repeats=timing_repeats, progress=progress, device=device, dtype=dtype)


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
    """The study's summary as text: per config adherence and fidelity with 95% intervals, NFE,
    predicted standalone time and the timing regime, then how the sweep compared to a loop."""
    s = res.summary()
    lines = []
    head = (f"{'config':<12} {'NFE':>5} {'time alone':>10} {'vs full':>7}  {'adherence (95% CI)':<22} "
            f"{'PSNR dB (95% CI)':<20} {'SSIM':>6}")
    lines.append(head)
    lines.append("-" * len(head))
    for r in s.itertuples():
        t = getattr(r, "time_eager_s", math.nan)
        share = getattr(r, "time_eager_vs_full", math.nan)
        adh = f"{r.adherence:6.1%} [{r.adherence_lo:.0%}, {r.adherence_hi:.0%}]" if "adherence" in s else ""
        ps = f"{r.psnr:5.1f} [{r.psnr_lo:.1f}, {r.psnr_hi:.1f}]"
        lines.append(f"{r.config:<12} {r.nfe:5.1f} {t:9.3f}s {share:7.0%}  {adh:<22} {ps:<20} {r.ssim:6.3f}")
    cost = next(iter(res.costs("eager").values()), None)
    if cost is not None:
        lines.append("")
        lines.append(f"timing ({cost['device_name']}, eager, batch {cost['batch']}, medians of {cost['repeats']} "
                     f"interleaved runs): guided step {cost['guided_step_ms']:.1f} ms, unguided "
                     f"{cost['unguided_step_ms']:.1f} ms, fixed {cost['fixed_ms']:.0f} ms -> {cost['regime']}: "
                     f"an unguided step saves {100 * cost['saving']:.0f}%")
        if cost.get("steady") is False:
            lines.append(f"the host's speed was still changing while these were measured ({100 * cost['drift']:.0f}% "
                         f"between the older and newer calls): the times alone are uncertain by about that")
        lines.append("'time alone' is the predicted wall time of one such run by itself (measured costs, not "
                     "the sweep's clock), 'vs full' the same as a share of full guidance's: the host's speed, "
                     "which moves the first, cancels in the second; PSNR/SSIM compare with full guidance "
                     "(cutoff=1) of the same prompt and seed.")
    f = res.frame
    batches = [e for e in res.events if e["kind"] == "batch"]
    if batches:
        ev = sum(e["evaluations"] for e in batches)
        loop = f.nfe.sum()
        lines.append(f"the sweep ran {len(f)} rows in {len(batches)} pipeline call(s), {sum(e['call_ms'] for e in batches) / 1e3:.1f} s "
                     f"of calls; a loop of standalone runs would take ~{f.time_eager_s.sum():.0f} s (predicted) and "
                     f"{loop:.0f} denoiser evaluations against the sweep's {ev:.0f}")
    return "\n".join(lines)
