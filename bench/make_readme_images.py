"""Make the README's pictures from the embedded model: the speed-vs-quality plot and a gallery strip.

    python bench/make_readme_images.py                    # writes docs/images/{speed_quality,gallery}.png
    python bench/make_readme_images.py --quick --out /tmp/img   # smoke test: 2 seeds, 3 cutoffs

It runs the study `python -m dlx demo` runs (dlx.demo.study: the embedded shapes model, 6 cutoffs ×
4 prompts × 4 seeds, 20 steps, adherence, PSNR, SSIM, predicted standalone time), so the README
shows the picture the main command produces. Times are predicted for the machine that runs the
script (`--device`); the plot's title says which. The sweep folder (`--work`) resumes, so a rerun
only redraws.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path


def _machine(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    n = torch.get_num_threads()
    return f"{platform.machine()} CPU, {n} thread{'' if n == 1 else 's'}"


def speed_quality(res, path: Path, device: str, steps: int) -> None:
    fig, ax = res.plot(metric="adherence")
    fig.set_size_inches(6.0, 3.6)
    ax.set_title(f"embedded shapes model, {steps} steps: CFG cutoff ratio, time and adherence "
                 f"({_machine(device)}, eager)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def gallery(res, path: Path, prompts: list[str], seed: int) -> None:
    """Rows: prompts; columns: configs (cutoff ratios), each tile the row's final image."""
    import matplotlib.pyplot as plt

    summary = res.summary()
    configs = list(summary["config"])
    nfe = dict(zip(summary["config"], summary["nfe"]))
    fig, axes = plt.subplots(len(prompts), len(configs), figsize=(1.25 * len(configs), 1.45 * len(prompts) + 0.2),
                             squeeze=False)
    for r, prompt in enumerate(prompts):
        for c, cfg in enumerate(configs):
            ax = axes[r][c]
            ax.imshow(res.images(config=cfg, prompt=prompt, seed=seed)[0], interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{cfg}\nNFE {nfe[cfg]:.0f}", fontsize=7)
        axes[r][0].set_ylabel(prompt.replace(" and ", "\nand ").replace(" on the ", "\non the ", 1), fontsize=5.5)
    fig.tight_layout(pad=0.3)
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "images"))
    ap.add_argument("--work", default=None, help="the study's sweep folder (default: a temporary folder)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="2 seeds, 3 cutoffs, 6 steps: a smoke test")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: the embedded model gains nothing from more, and on a "
                         "shared CPU spinning threads make the timing meaningless)")
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import torch

    from dlx.demo import STUDY_CUTOFFS, STUDY_PROMPTS, study

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="dlx-readme-"))
    seeds, cutoffs, steps = (2, [0.0, 0.5, 1.0], 6) if args.quick else (4, STUDY_CUTOFFS, 20)
    if args.device != "cpu":
        from dlx.sweeps import sweep

        from dlx import zoo

        res = sweep("shapes", prompts=STUDY_PROMPTS, seeds=range(seeds), cutoffs=cutoffs,
                    metrics=["adherence", "psnr", "ssim"], out=work, num_inference_steps=steps,
                    guidance_scale=zoo.info("shapes")["recommended_guidance_scale"], timing=("eager",),
                    device=args.device, progress=False)
    else:
        res = study(work, seeds=seeds, steps=steps, cutoffs=cutoffs, progress=False)
    speed_quality(res, out / "speed_quality.png", args.device, steps)
    gallery(res, out / "gallery.png", STUDY_PROMPTS[:2], seed=0)
    print(res.summary()[["config", "nfe", "time_eager_s", "adherence", "psnr", "ssim"]].to_string(index=False))
    print(f"wrote {out / 'speed_quality.png'} and {out / 'gallery.png'} (sweep in {work})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
