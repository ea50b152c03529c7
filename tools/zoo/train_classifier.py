"""Train the adherence metric's shape classifier (dlx/zoo/shapes/adherence_classifier.safetensors)
and measure the metric on fresh renders.

    python tools/zoo/train_classifier.py --out dlx/zoo/shapes/adherence_classifier.safetensors

Trains ``dlx.zoo.metric.ShapeNet`` on regions segmented from fresh, randomly blurred and noised
renders (as ``dlx.zoo.adherence`` sees them) and prints the metric's accuracy on fresh renders of
another seed (:func:`evaluate_metric`, also a figure of the model card: measure_shapes.py).

Not part of the dlx package: nothing at runtime imports it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # dlx from this checkout, installed or not

from dlx.zoo import metric  # noqa: E402
from dlx.zoo import shapes_data as sd  # noqa: E402
from dlx.zoo.metric import (  # noqa: E402
    MIN_AREA,
    ShapeNet,
    _crops,
    _largest_component,
    adherence,
    analyse,
    load_classifier,
    segment,
)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Generation-like damage for training the classifier: blur, noise, colour shifts."""
    B = x.shape[0]
    k = torch.tensor([0.25, 0.5, 0.25])
    blur = (k.view(1, 3) * k.view(3, 1)).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    xb = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), blur, groups=3)
    w = torch.rand(B, 1, 1, 1, generator=g)
    x = w * xb + (1 - w) * x
    x = x + 0.06 * torch.rand(B, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
    x = x + 0.05 * (torch.rand(B, 3, 1, 1, generator=g) - 0.5)
    return x.clamp(0, 1)


def train_classifier(steps: int = 1500, batch: int = 128, seed: int = 7, out: str | Path | None = None,
                     log=print) -> dict:
    """Train ShapeNet on regions segmented from fresh renders (as adherence() sees them);
    returns measured accuracies on fresh, unaugmented renders of another seed."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = ShapeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for step in range(steps):
        sc = sd.sample_scenes(batch, g)
        x = augment(sd.render(sc), g)
        lab = segment(x)
        n_obj = torch.where(sc.template == sd.T_SINGLE, 1, 2)
        cols = torch.cat([sc.colour[:, 0], sc.colour[:, 1][n_obj == 2]])
        shp = torch.cat([sc.shape[:, 0], sc.shape[:, 1][n_obj == 2]])
        img = torch.cat([torch.arange(batch), torch.arange(batch)[n_obj == 2]])
        masks = lab[img] == cols.view(-1, 1, 1)
        comp = _largest_component(masks)
        crops, _, area = _crops(comp)
        keep = area >= MIN_AREA
        loss = F.cross_entropy(net(crops[keep]), shp[keep])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"classifier step {step} loss {loss.item():.4f}")
    net.eval()
    metric._CLF.clear()  # a cached classifier is now stale
    metrics = evaluate_metric(net, n=2000, seed=seed + 1000)
    if out:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out))
    return metrics


@torch.no_grad()
def evaluate_metric(net: ShapeNet | None = None, n: int = 2000, seed: int = 12345) -> dict:
    """Accuracy of the metric on fresh renders: per-object shape accuracy, share of renders
    judged ok for their own caption, and share judged ok for a mismatched caption."""
    net = net or load_classifier()
    g = torch.Generator().manual_seed(seed)
    sc = sd.sample_scenes(n, g)
    x = sd.render(sc)
    caps = sc.captions()
    n_obj = [1 if int(t) == sd.T_SINGLE else 2 for t in sc.template]
    cols = [sc.colour[i, :n_obj[i]].tolist() for i in range(n)]
    res = analyse(x, cols, net)
    correct = total = 0
    for i in range(n):
        for j in range(n_obj[i]):
            total += 1
            correct += int(res["shape"][i, j] == sc.shape[i, j])
    ok_true = sum(r["ok"] for r in adherence(x, caps, False, net)) / n
    # mismatched: each caption corrupted in one part (a shape, a colour or the relation)
    wrong = []
    for i in range(n):
        c0, c1 = int(sc.colour[i, 0]), int(sc.colour[i, 1])
        s0, s1 = int(sc.shape[i, 0]), int(sc.shape[i, 1])
        t, r = int(sc.template[i]), int(sc.relation[i])
        kind = int(torch.randint(3 if t == sd.T_RELATION else 2, (1,), generator=g))
        if kind == 0:  # another shape for one object
            s0 = (s0 + 1 + int(torch.randint(len(sd.SHAPES) - 1, (1,), generator=g))) % len(sd.SHAPES)
        elif kind == 1:  # a colour that is not in the image
            free = [k for k in range(len(sd.COLOURS)) if k not in (c0, c1)]
            c0 = free[int(torch.randint(len(free), (1,), generator=g))]
        else:  # the opposite relation
            r = r ^ 1
        wrong.append(sd.caption(t, [c0, c1], [s0, s1], r))
    ok_wrong = sum(r["ok"] for r in adherence(x, wrong, False, net)) / n
    return {"shape_accuracy": correct / total, "ok_on_own_caption": ok_true,
            "ok_on_mismatched_caption": ok_wrong, "n_renders": n}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="where to write the classifier's weights")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    print(json.dumps(train_classifier(args.steps, args.batch, args.seed, out=args.out), indent=1))


if __name__ == "__main__":
    main()
