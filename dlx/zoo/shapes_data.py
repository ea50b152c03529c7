"""Procedural "shapes" data: 64x64 RGB renders of coloured shapes with captions.

Everything is generated from a seed, vectorised over a batch in torch, so the same
code feeds GPU training and CPU tests.  Only torch is imported here.

Caption language (one word = one token of the shipped tokenizer):

    single:    "a {colour} {shape}"
    placed:    "a {colour} {shape} on the {side} and a {colour2} {shape2} on the {side2}"
    and:       "a {colour} {shape} and a {colour2} {shape2}"

with (side, side2) one of (left, right), (right, left), (top, bottom), (bottom, top): the
first object lies in that half of the canvas and the second in the opposite one, so the
first stands to the second in the relation RELATIONS[i] = "left of", "right of", "above",
"below".  The two objects of one caption always have different colours (shapes may
repeat), so a colour names one object; the background is a plain grey, never named.

(A first language said "a red circle left of a blue square"; three GPU runs, 8.3k steps,
learned colours, shapes and the relation's axis but placed the two objects at chance along
it: the causal CLIP text encoder sees the relation word only after the first object.  Here
each object's side word follows it, so it carries that object's colour and shape.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

IMAGE_SIZE = 64
COLOURS = ["red", "green", "blue", "yellow", "purple", "cyan"]
PALETTE = torch.tensor(
    [
        [0.90, 0.10, 0.10],  # red
        [0.10, 0.75, 0.15],  # green
        [0.10, 0.25, 0.95],  # blue
        [0.95, 0.90, 0.10],  # yellow
        [0.65, 0.15, 0.85],  # purple
        [0.10, 0.85, 0.90],  # cyan
    ]
)
SHAPES = ["circle", "square", "triangle", "cross", "diamond", "ring", "star", "heart"]
RELATIONS = ["left of", "right of", "above", "below"]  # how object 0 stands to object 1
SIDES = [("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top")]
TEMPLATES = {
    "single": "a {colour} {shape}",
    "relation": "a {colour} {shape} on the {side} and a {colour2} {shape2} on the {side2}",
    "and": "a {colour} {shape} and a {colour2} {shape2}",
}
# share of each template in the training data and in held-out evaluation sets
TEMPLATE_WEIGHTS = {"single": 0.2, "relation": 0.65, "and": 0.15}
T_SINGLE, T_RELATION, T_AND = 0, 1, 2
TEMPLATE_NAMES = ["single", "relation", "and"]

# the closed vocabulary, in token order after the special tokens
# (the first seven, colours and shapes keep the token ids of the first language)
WORDS = (["a", "and", "of", "left", "right", "above", "below"] + COLOURS + SHAPES[:4]
         + ["on", "the", "top", "bottom"] + SHAPES[4:])
MAX_TOKENS = 16  # tokenizer model_max_length: bos + at most 13 words + eos, padded

# grey levels of the plain backgrounds: dark or light, never mid grey
BG_RANGES = ((0.05, 0.30), (0.70, 0.95))
R_MIN, R_MAX = 7.0, 11.0  # object half-size in pixels
MARGIN = 1.0


@dataclass
class Scene:
    """A batch of scene parameters (all tensors of length B, on one device)."""

    template: torch.Tensor  # long: T_SINGLE / T_RELATION / T_AND
    colour: torch.Tensor  # long (B, 2): colour index of object 0 and 1
    shape: torch.Tensor  # long (B, 2)
    relation: torch.Tensor  # long: index into RELATIONS (how object 0 stands to object 1)
    centre: torch.Tensor  # float (B, 2, 2): (x, y) pixel centres
    radius: torch.Tensor  # float (B, 2)
    bg: torch.Tensor  # float (B,): grey level

    def __len__(self) -> int:
        return int(self.template.shape[0])

    def to(self, device) -> "Scene":
        return Scene(**{k: v.to(device) for k, v in self.__dict__.items()})

    def captions(self) -> list[str]:
        return [caption(int(t), c.tolist(), s.tolist(), int(r)) for t, c, s, r in zip(
            self.template.cpu(), self.colour.cpu(), self.shape.cpu(), self.relation.cpu())]


def caption(template: int, colour, shape, relation: int) -> str:
    first = f"a {COLOURS[colour[0]]} {SHAPES[shape[0]]}"
    if template == T_SINGLE:
        return first
    second = f"a {COLOURS[colour[1]]} {SHAPES[shape[1]]}"
    if template == T_AND:
        return f"{first} and {second}"
    s0, s1 = SIDES[relation]
    return f"{first} on the {s0} and {second} on the {s1}"


def parse(prompt: str) -> dict:
    """Parse a caption of the language into its parts; DlxError if it is not one.
    "relation" is how the first object stands to the second ("left of", ...) or None."""
    from dlx.errors import DlxError

    words = prompt.strip().lower().replace(",", " ").split()
    bad = DlxError(f"not a caption of the shapes language: {prompt!r}")

    def obj(ws):
        if len(ws) != 3 or ws[0] != "a" or ws[1] not in COLOURS or ws[2] not in SHAPES:
            raise bad
        return {"colour": ws[1], "shape": ws[2]}

    if len(words) == 3:
        return {"template": "single", "objects": [obj(words)], "relation": None}
    if len(words) == 7 and words[3] == "and":
        objs, rel, template = [obj(words[:3]), obj(words[4:])], None, "and"
    elif len(words) == 13 and words[3:5] == ["on", "the"] and words[6] == "and" \
            and words[10:12] == ["on", "the"]:
        sides = (words[5], words[12])
        if sides not in SIDES:
            raise bad
        objs, rel, template = [obj(words[:3]), obj(words[7:10])], RELATIONS[SIDES.index(sides)], "relation"
    else:
        raise bad
    if objs[0]["colour"] == objs[1]["colour"]:
        raise DlxError(f"the two objects of a caption must differ in colour: {prompt!r}")
    return {"template": template, "objects": objs, "relation": rel}


def sample_scenes(n: int, generator: torch.Generator, device="cpu",
                  template_weights: dict | None = None) -> Scene:
    """Draw n random scenes. Deterministic given the generator's state."""
    g = generator
    gd = g.device if hasattr(g, "device") else torch.device("cpu")

    def U(*shape):
        return torch.rand(*shape, generator=g, device=gd).to(device)

    w = template_weights or TEMPLATE_WEIGHTS
    probs = torch.tensor([w.get(k, 0.0) for k in TEMPLATE_NAMES], dtype=torch.float)
    template = torch.multinomial(probs.to(gd), n, replacement=True, generator=g).to(device)
    c0 = (U(n) * len(COLOURS)).long().clamp_max(len(COLOURS) - 1)
    c1 = (c0 + 1 + (U(n) * (len(COLOURS) - 1)).long().clamp_max(len(COLOURS) - 2)) % len(COLOURS)
    colour = torch.stack([c0, c1], 1)
    shape = (U(n, 2) * len(SHAPES)).long().clamp_max(len(SHAPES) - 1)
    relation = (U(n) * 4).long().clamp_max(3)
    radius = R_MIN + (R_MAX - R_MIN) * U(n, 2)
    lo, hi = MARGIN, IMAGE_SIZE - MARGIN

    # placement along the relation's axis: object 0 before (left/above) or after object 1,
    # each in its own half of the canvas (so the relation also holds against the centre),
    # never overlapping
    r0, r1 = radius[:, 0], radius[:, 1]
    gap_min = r0 + r1 + 3.0
    mid = IMAGE_SIZE / 2
    first = relation % 2 == 0  # left of / above: object 0 has the smaller coordinate
    r_first = torch.where(first, r0, r1)
    r_second = torch.where(first, r1, r0)
    f_lo = lo + r_first
    f_hi = torch.minimum(torch.full_like(f_lo, mid - 2.0), hi - r_second - gap_min)
    a_first = f_lo + (f_hi - f_lo) * U(n)
    s_lo = torch.maximum(torch.full_like(f_lo, mid + 2.0), a_first + gap_min)
    s_hi = hi - r_second
    a_second = s_lo + (s_hi - s_lo) * U(n)
    gap = a_second - a_first
    a0 = torch.where(first, a_first, a_second)
    a1 = torch.where(first, a_second, a_first)
    # across the axis: object 0 anywhere, object 1 within half the gap of it
    b0 = lo + r0 + (hi - lo - 2 * r0) * U(n)
    off = (U(n) * 2 - 1) * 0.5 * gap
    b1 = torch.minimum(torch.maximum(b0 + off, lo + r1), hi - r1)
    horizontal = relation < 2
    x0 = torch.where(horizontal, a0, b0)
    y0 = torch.where(horizontal, b0, a0)
    x1 = torch.where(horizontal, a1, b1)
    y1 = torch.where(horizontal, b1, a1)
    centre = torch.stack([torch.stack([x0, y0], 1), torch.stack([x1, y1], 1)], 1)

    # single-object scenes: object 0 anywhere in the canvas
    single = template == T_SINGLE
    xs = lo + r0 + (hi - lo - 2 * r0) * U(n)
    ys = lo + r0 + (hi - lo - 2 * r0) * U(n)
    centre[:, 0, 0] = torch.where(single, xs, centre[:, 0, 0])
    centre[:, 0, 1] = torch.where(single, ys, centre[:, 0, 1])

    dark = U(n) < 0.5
    (dl, dh), (ll, lh) = BG_RANGES
    t = U(n)
    bg = torch.where(dark, dl + (dh - dl) * t, ll + (lh - ll) * t)
    return Scene(template, colour, shape, relation, centre, radius, bg)


def corrupt_captions(scene: Scene, rate: float, generator: torch.Generator) -> Scene:
    """The scenes as a noisy captioner describes them: a share ``rate`` of them get one
    fact wrong (equally often: an object's colour, an object's shape, or, for placed
    captions, the sides swapped), as alt-text on the web gets details wrong.  Training on
    such captions makes p(image | caption) put about ``rate`` of its mass on images that
    contradict the caption; classifier-free guidance, which sharpens p(caption | image),
    pulls samples back to the caption, as it does for models trained on web captions."""
    g = generator
    gd = g.device if hasattr(g, "device") else torch.device("cpu")
    dev = scene.template.device
    B = len(scene)

    def U(*shape):
        return torch.rand(*shape, generator=g, device=gd).to(dev)

    noisy = U(B) < rate
    two = scene.template != T_SINGLE
    placed = scene.template == T_RELATION
    # which fact: 0 colour, 1 shape, 2 sides (only for placed captions)
    kind = (U(B) * torch.where(placed, 3.0, 2.0)).long().clamp_max(2)
    k = torch.where(two, (U(B) * 2).long().clamp_max(1), torch.zeros_like(kind))  # which object
    colour, shape, relation = scene.colour.clone(), scene.shape.clone(), scene.relation.clone()
    rows = torch.arange(B, device=dev)
    # a new colour for object k: differs from its own and from the other object's colour
    nC = len(COLOURS)
    other = colour[rows, 1 - k]
    cand = (colour[rows, k] + 1 + (U(B) * (nC - 1)).long().clamp_max(nC - 2)) % nC
    cand = torch.where(two & (cand == other), (cand + 1) % nC, cand)
    cand = torch.where(two & (cand == colour[rows, k]), (cand + 1) % nC, cand)
    new_shape = (shape[rows, k] + 1 + (U(B) * (len(SHAPES) - 1)).long().clamp_max(len(SHAPES) - 2)) % len(SHAPES)
    do_c, do_s, do_r = noisy & (kind == 0), noisy & (kind == 1), noisy & (kind == 2)
    colour[rows, k] = torch.where(do_c, cand, colour[rows, k])
    shape[rows, k] = torch.where(do_s, new_shape, shape[rows, k])
    relation = torch.where(do_r, relation ^ 1, relation)  # left<->right, top<->bottom
    return Scene(scene.template, colour, shape, relation, scene.centre, scene.radius, scene.bg)


def _sdf(shape: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance (pixels, negative inside) of each shape kind; shapes (B,1,1)."""
    ax, ay = dx.abs(), dy.abs()
    d_circle = torch.sqrt(dx * dx + dy * dy) - r
    d_square = torch.maximum(ax, ay) - 0.85 * r
    # triangle pointing up: apex (0, -1.1 r), base corners (+-1.15 r, 0.85 r)
    h, w = 1.95, 1.15
    n_len = math.sqrt(h * h + w * w)
    d_side = (h * ax - w * (dy + 1.1 * r)) / n_len  # the two slanted sides
    d_base = dy - 0.85 * r
    d_triangle = torch.maximum(d_side, d_base)
    # cross / plus: two bars of half-width 0.33 r
    t = 0.33 * r
    d_bar_h = torch.maximum(ax - r, ay - t)
    d_bar_v = torch.maximum(ax - t, ay - r)
    d_cross = torch.minimum(d_bar_h, d_bar_v)
    # diamond: a square standing on a corner, half-diagonal 1.15 r
    d_diamond = (ax + ay - 1.15 * r) / math.sqrt(2.0)
    # ring: outer radius r, hole radius 0.45 r
    d_ring = (torch.sqrt(dx * dx + dy * dy) - 0.725 * r).abs() - 0.275 * r
    out = torch.where(shape == 0, d_circle, d_square)
    out = torch.where(shape == 2, d_triangle, out)
    out = torch.where(shape == 3, d_cross, out)
    out = torch.where(shape == 4, d_diamond, out)
    # star: five points of radius 1.1 r, inner corners at 0.5 r (distance along the ray,
    # close enough to a signed distance for the one-pixel anti-aliasing)
    rho = torch.sqrt(dx * dx + dy * dy)
    theta = torch.atan2(dx, -dy)  # 0 at the top point
    sector = 2 * math.pi / 5
    frac = ((theta / sector) % 1.0 - 0.5).abs() * 2  # 1 at a point, 0 between points
    d_star = (rho - (0.5 + 0.6 * frac) * r) * 0.8
    # heart: two lobes (circles of radius 0.58 r) over a square standing on its corner
    lobe = 0.58 * r
    d_lobes = torch.minimum(torch.sqrt((dx + 0.45 * r) ** 2 + (dy + 0.3 * r) ** 2),
                            torch.sqrt((dx - 0.45 * r) ** 2 + (dy + 0.3 * r) ** 2)) - lobe
    d_point = torch.maximum((ax + dy - 0.78 * r) / math.sqrt(2.0), -dy - 0.3 * r)
    d_heart = torch.minimum(d_lobes, d_point)
    out = torch.where(shape == 5, d_ring, out)
    out = torch.where(shape == 6, d_star, out)
    out = torch.where(shape == 7, d_heart, out)
    return out


def render(scene: Scene, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Render scenes to images (B, 3, size, size) in [0, 1], anti-aliased."""
    dev = scene.centre.device
    B = len(scene)
    pal = PALETTE.to(dev)
    coords = torch.arange(size, device=dev, dtype=torch.float32) + 0.5
    X = coords.view(1, 1, size)
    Y = coords.view(1, size, 1)
    img = scene.bg.view(B, 1, 1, 1).expand(B, 3, size, size).clone()
    n_obj = torch.where(scene.template == T_SINGLE, 1, 2)
    for k in range(2):
        cx = scene.centre[:, k, 0].view(B, 1, 1)
        cy = scene.centre[:, k, 1].view(B, 1, 1)
        r = scene.radius[:, k].view(B, 1, 1)
        d = _sdf(scene.shape[:, k].view(B, 1, 1), X - cx, Y - cy, r)
        alpha = (0.5 - d).clamp(0, 1) * (n_obj > k).float().view(B, 1, 1)
        col = pal[scene.colour[:, k]].view(B, 3, 1, 1)
        img = img * (1 - alpha.unsqueeze(1)) + col * alpha.unsqueeze(1)
    return img


def token_ids(scene: Scene, vocab: dict, max_len: int = MAX_TOKENS) -> torch.Tensor:
    """Token ids of the scenes' captions exactly as the shipped CLIPTokenizer gives them
    (padding="max_length"), built without the tokenizer so training stays on the GPU."""
    dev = scene.template.device
    B = len(scene)
    wid = lambda w: vocab[w + "</w>"]  # noqa: E731
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    colour_ids = torch.tensor([wid(c) for c in COLOURS], device=dev)
    shape_ids = torch.tensor([wid(s) for s in SHAPES], device=dev)
    side_ids = torch.tensor([[wid(a), wid(b)] for a, b in SIDES], device=dev)
    full = lambda v: torch.full((B,), v, dtype=torch.long, device=dev)  # noqa: E731
    a, on, the, and_ = full(wid("a")), full(wid("on")), full(wid("the")), full(wid("and"))
    c0, s0 = colour_ids[scene.colour[:, 0]], shape_ids[scene.shape[:, 0]]
    c1, s1 = colour_ids[scene.colour[:, 1]], shape_ids[scene.shape[:, 1]]
    side = side_ids[scene.relation]
    rows = {
        T_SINGLE: [a, c0, s0],
        T_AND: [a, c0, s0, and_, a, c1, s1],
        T_RELATION: [a, c0, s0, on, the, side[:, 0], and_, a, c1, s1, on, the, side[:, 1]],
    }
    ids = torch.full((B, max_len), eos, dtype=torch.long, device=dev)  # pad = eos
    ids[:, 0] = bos
    for t, words in rows.items():
        sel = scene.template == t
        row = torch.stack([full(bos)] + words + [full(eos)], 1)
        ids[:, :row.shape[1]] = torch.where(sel.view(B, 1), row, ids[:, :row.shape[1]])
    return ids


def empty_ids(vocab: dict, n: int, device="cpu", max_len: int = MAX_TOKENS) -> torch.Tensor:
    """Token ids of the empty caption "" (the pipeline's unconditional input)."""
    ids = torch.full((n, max_len), vocab["<|endoftext|>"], dtype=torch.long, device=device)
    ids[:, 0] = vocab["<|startoftext|>"]
    return ids


def heldout_pairs(n: int = 200, seed: int = 20261125) -> list[tuple[str, int]]:
    """The held-out (prompt, seed) pairs of the model card: prompts drawn from the language
    with the training template mix, seeds from a range training never uses."""
    g = torch.Generator().manual_seed(seed)
    sc = sample_scenes(n, g)
    return [(p, 10_000_000 + i) for i, p in enumerate(sc.captions())]
