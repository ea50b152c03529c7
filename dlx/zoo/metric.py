"""Prompt adherence for the shapes model: does each image show what its caption says?

Per image and per object of the caption:
  colour: a connected region of that palette colour exists (pixels assigned to the nearest
          of palette + background colours, within a distance; the largest connected
          component after a 3x3 opening; at least MIN_AREA pixels);
  shape:  a small shipped CNN classifies that region's mask (cropped, resampled to 24x24)
          as the caption's shape;
  relation (captions with one): the centroids of the two regions stand in that relation,
          by at least REL_MARGIN pixels along the relation's axis.
`ok` is the conjunction. `n_extra` counts regions of palette colours the caption does not
name (reported, not part of `ok`).

Only torch is imported at module import; pandas when a DataFrame is asked for. The classifier's
training and the metric's own accuracy check live outside the package, in
tools/zoo/train_classifier.py.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dlx.zoo import shapes_data as sd

MIN_AREA = 30
COLOUR_TOL = 0.30
REL_MARGIN = 3.0
CROP = 24
CLASSIFIER_FILE = "adherence_classifier.safetensors"


class ShapeNet(nn.Module):
    """Mask crop (1, 24, 24) -> shape logits."""

    def __init__(self, n_shapes: int = len(sd.SHAPES)):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 12
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 6
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 3
            nn.Flatten(), nn.Linear(64 * 9, 64), nn.ReLU(), nn.Linear(64, n_shapes))

    def forward(self, x):
        return self.body(x)


def to_tensor(images) -> torch.Tensor:
    """PIL images / uint8 or float arrays (H, W, 3) / a tensor (B, 3, H, W) in [0, 1]
    -> float tensor (B, 3, 64, 64) on the CPU."""
    if isinstance(images, torch.Tensor):
        x = images.detach().float().cpu()
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.shape[1] != 3 and x.shape[-1] == 3:
            x = x.permute(0, 3, 1, 2)
        if x.max() > 1.5:
            x = x / 255.0
    else:
        import numpy as np

        arrs = []
        for im in images:
            a = np.asarray(im.convert("RGB") if hasattr(im, "convert") else im)
            a = a.astype("float32") / (255.0 if a.dtype == np.uint8 or a.max() > 1.5 else 1.0)
            arrs.append(torch.from_numpy(a).permute(2, 0, 1))
        x = torch.stack(arrs)
    if x.shape[-1] != sd.IMAGE_SIZE or x.shape[-2] != sd.IMAGE_SIZE:
        x = F.interpolate(x, size=(sd.IMAGE_SIZE, sd.IMAGE_SIZE), mode="area")
    return x.clamp(0, 1)


def segment(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel label: palette index, len(PALETTE) for background, -1 for neither."""
    B = x.shape[0]
    border = torch.cat([x[:, :, 0, :], x[:, :, -1, :], x[:, :, :, 0], x[:, :, :, -1]], 2)
    bg = border.median(dim=2).values  # (B, 3)
    pal = sd.PALETTE.to(x.device)
    cols = torch.cat([pal.unsqueeze(0).expand(B, -1, -1), bg.unsqueeze(1)], 1)  # (B, K+1, 3)
    d = torch.cdist(x.flatten(2).transpose(1, 2), cols)  # (B, HW, K+1)
    dmin, lab = d.min(2)
    lab = torch.where(dmin < COLOUR_TOL, lab, torch.full_like(lab, -1))
    return lab.view(B, *x.shape[2:])


def _largest_component(mask: torch.Tensor) -> torch.Tensor:
    """mask (N, H, W) bool -> its largest 8-connected component, after a 3x3 opening."""
    m = mask.float().unsqueeze(1)
    m = -F.max_pool2d(-m, 3, 1, 1)  # erode
    m = F.max_pool2d(m, 3, 1, 1) * mask.float().unsqueeze(1)  # dilate within the mask
    N, _, H, W = m.shape
    idx = torch.arange(1, H * W + 1, dtype=torch.float32, device=m.device).view(1, 1, H, W)
    lab = idx * m
    for _ in range(H * 2):
        new = F.max_pool2d(lab, 3, 1, 1) * m
        if torch.equal(new, lab):
            break
        lab = new
    lab = lab.view(N, -1).long()
    out = torch.zeros(N, H * W, dtype=torch.bool, device=m.device)
    for i in range(N):
        if lab[i].max() == 0:
            continue
        counts = torch.bincount(lab[i], minlength=H * W + 1)
        counts[0] = 0
        out[i] = lab[i] == counts.argmax()
    return out.view(N, H, W)


def _crops(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mask (N, H, W) bool -> (crops (N, 1, CROP, CROP), centroids (N, 2) xy, areas (N,))."""
    N, H, W = mask.shape
    m = mask.float()
    area = m.flatten(1).sum(1)
    ys = torch.arange(H, dtype=torch.float32).view(1, H, 1) + 0.5
    xs = torch.arange(W, dtype=torch.float32).view(1, 1, W) + 0.5
    a = area.clamp_min(1)
    cx = (m * xs).flatten(1).sum(1) / a
    cy = (m * ys).flatten(1).sum(1) / a
    big = 1e4
    x0 = torch.where(mask, xs.expand(N, H, W), big).flatten(1).min(1).values
    x1 = torch.where(mask, xs.expand(N, H, W), -big).flatten(1).max(1).values
    y0 = torch.where(mask, ys.expand(N, H, W), big).flatten(1).min(1).values
    y1 = torch.where(mask, ys.expand(N, H, W), -big).flatten(1).max(1).values
    bx, by = (x0 + x1) / 2, (y0 + y1) / 2
    side = (torch.maximum(x1 - x0, y1 - y0) + 3).clamp_min(4)
    lin = torch.linspace(-0.5, 0.5, CROP)
    gx = (bx.view(N, 1, 1) + side.view(N, 1, 1) * lin.view(1, 1, CROP)) / W * 2 - 1
    gy = (by.view(N, 1, 1) + side.view(N, 1, 1) * lin.view(1, CROP, 1)) / H * 2 - 1
    grid = torch.stack([gx.expand(N, CROP, CROP), gy.expand(N, CROP, CROP)], -1)
    crops = F.grid_sample(m.unsqueeze(1), grid, mode="bilinear", align_corners=False)
    return crops, torch.stack([cx, cy], 1), area


_CLF: dict = {}


def load_classifier(path: str | Path | None = None) -> ShapeNet:
    from dlx.errors import DlxError

    path = Path(path) if path else Path(__file__).parent / "shapes" / CLASSIFIER_FILE
    key = str(path)
    if key not in _CLF:
        if not path.is_file():
            raise DlxError(f"adherence classifier weights missing: {path} (folder {path.parent})")
        from safetensors.torch import load_file

        net = ShapeNet()
        net.load_state_dict(load_file(str(path)))
        _CLF[key] = net.eval()
    return _CLF[key]


@torch.no_grad()
def analyse(x: torch.Tensor, colours: list[list[int]], net: ShapeNet | None = None):
    """For images x (B,3,64,64) and per image a list of colour indices, the region of each
    colour: returns dict of tensors (B, 2): present, shape (pred, -1 if absent),
    shape_p, cx, cy; and n_extra (B,)."""
    net = net or load_classifier()
    B = x.shape[0]
    lab = segment(x)
    K = len(sd.COLOURS)
    masks = torch.stack([lab == k for k in range(K)], 1).float()  # (B, K, H, W)
    opened = F.max_pool2d(-F.max_pool2d(-masks, 3, 1, 1), 3, 1, 1) * masks
    present_any = opened.flatten(2).sum(2) >= MIN_AREA  # (B, K)
    pairs = [(i, j, c) for i, cs in enumerate(colours) for j, c in enumerate(cs)]
    out = {k: torch.zeros(B, 2) for k in ("cx", "cy", "shape_p")}
    out["present"] = torch.zeros(B, 2, dtype=torch.bool)
    out["shape"] = torch.full((B, 2), -1, dtype=torch.long)
    if pairs:
        ii = torch.tensor([p[0] for p in pairs])
        cc = torch.tensor([p[2] for p in pairs])
        comp = _largest_component(lab[ii] == cc.view(-1, 1, 1))
        crops, cent, area = _crops(comp)
        prob = net(crops).softmax(-1)
        for n, (i, j, c) in enumerate(pairs):
            present = bool(area[n] >= MIN_AREA)
            out["present"][i, j] = present
            out["shape"][i, j] = int(prob[n].argmax()) if present else -1
            out["shape_p"][i, j] = prob[n].max()
            out["cx"][i, j], out["cy"][i, j] = cent[n, 0], cent[n, 1]
    n_extra = torch.zeros(B, dtype=torch.long)
    for i, cs in enumerate(colours):
        n_extra[i] = sum(int(present_any[i, k]) for k in range(K) if k not in cs)
    out["n_extra"] = n_extra
    return out


def _images_arg(images) -> torch.Tensor:
    """``images`` as ``to_tensor`` makes them, or a DlxError naming the argument."""
    from dlx.errors import DlxError

    what = ("argument `images` must be PIL images, arrays (H, W, 3) or a tensor (B, 3, H, W) "
            "in [0, 1]")
    if isinstance(images, (str, bytes)) or not (isinstance(images, torch.Tensor) or hasattr(images, "__iter__")):
        raise DlxError(f"{what}; got {type(images).__name__} {images!r:.80}")
    if isinstance(images, torch.Tensor):
        if images.numel() == 0 or images.dim() not in (3, 4) or 3 not in (images.shape[-3], images.shape[-1]):
            raise DlxError(f"{what}; got a tensor of shape {tuple(images.shape)}")
    elif hasattr(images, "__len__") and len(images) == 0:
        raise DlxError(f"{what}; got an empty {type(images).__name__}")
    try:
        x = to_tensor(images)
    except (TypeError, ValueError, AttributeError, RuntimeError, IndexError) as e:
        raise DlxError(f"{what}; could not read them ({type(e).__name__}: {e})") from None
    if x.numel() == 0:
        raise DlxError(f"{what}; got no images")
    if not torch.isfinite(x).all():
        raise DlxError("argument `images` holds NaN or infinite values")
    return x


def adherence(images, prompts, as_frame: bool = True, net: ShapeNet | None = None):
    """Per image, whether it shows its prompt: a pandas DataFrame, one row per image, with
    columns prompt, template, colour0, shape0, colour1, shape1, relation (nullable
    booleans: <NA> where the prompt has no such part), ok (bool), n_extra (int),
    shape0_pred, shape1_pred (shape names or None).  With as_frame=False, a list of dicts.
    Prompts must be captions of the shapes language (dlx.zoo.info("shapes")); the images
    PIL images, arrays (H, W, 3) or a tensor (B, 3, H, W) in [0, 1]."""
    from dlx.errors import DlxError

    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise DlxError(f"argument `prompts` must be a caption or a non-empty list of captions; got {prompts!r}")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise DlxError(f"argument `prompts` must hold captions (str); prompts[{bad[0]}] is {prompts[bad[0]]!r}")
    if not isinstance(as_frame, bool):
        raise DlxError(f"argument `as_frame` must be a bool; got {as_frame!r}")
    x = _images_arg(images)
    if x.shape[0] != len(prompts):
        raise DlxError(f"arguments `images` and `prompts` differ in length: {x.shape[0]} images but "
                       f"{len(prompts)} prompts")
    parsed = []
    for i, p in enumerate(prompts):
        try:
            parsed.append(sd.parse(p))
        except DlxError as e:
            raise DlxError(f"argument `prompts`, entry {i}: {e}") from None
    colours = [[sd.COLOURS.index(o["colour"]) for o in q["objects"]] for q in parsed]
    res = analyse(x, colours, net)
    rows = []
    for i, (p, q) in enumerate(zip(prompts, parsed)):
        row = {"prompt": p, "template": q["template"]}
        oks = []
        for j in range(2):
            if j < len(q["objects"]):
                present = bool(res["present"][i, j])
                pred = int(res["shape"][i, j])
                shape_ok = present and sd.SHAPES[pred] == q["objects"][j]["shape"]
                row[f"colour{j}"], row[f"shape{j}"] = present, shape_ok
                row[f"shape{j}_pred"] = sd.SHAPES[pred] if present else None
                oks += [present, shape_ok]
            else:
                row[f"colour{j}"] = row[f"shape{j}"] = None
                row[f"shape{j}_pred"] = None
        rel = q["relation"]
        if rel is None:
            row["relation"] = None
        else:
            dx = float(res["cx"][i, 1] - res["cx"][i, 0])  # second minus first
            dy = float(res["cy"][i, 1] - res["cy"][i, 0])
            both = bool(res["present"][i, 0] and res["present"][i, 1])
            hold = {"left of": dx > REL_MARGIN, "right of": -dx > REL_MARGIN,
                    "above": dy > REL_MARGIN, "below": -dy > REL_MARGIN}[rel]
            row["relation"] = both and hold
            oks.append(row["relation"])
        row["ok"] = all(oks)
        row["n_extra"] = int(res["n_extra"][i])
        rows.append(row)
    if not as_frame:
        return rows
    import pandas as pd

    df = pd.DataFrame(rows, columns=["prompt", "template", "colour0", "shape0", "colour1",
                                     "shape1", "relation", "ok", "n_extra", "shape0_pred",
                                     "shape1_pred"])
    for c in ("colour0", "shape0", "colour1", "shape1", "relation"):
        df[c] = df[c].astype("boolean")
    df["ok"] = df["ok"].astype(bool)
    return df
