"""Procedural "shapes" data: 64x64 RGB renders of coloured shapes with captions.

Everything is generated from a seed, vectorised over a batch in torch, so the same
code feeds GPU training and CPU tests.  Only torch is imported here.

Caption language (one word = one token of the shipped tokenizer):

    single:    "a {colour} {shape}"
    relation:  "a {colour} {shape} {relation} a {colour} {shape}"
    and:       "a {colour} {shape} and a {colour} {shape}"

Relations are "left of", "right of", "above", "below" and are read from the first
object to the second ("a red circle left of a blue square": the red circle's centre is
left of the blue square's).  The two objects of one caption always have different
colours (shapes may repeat), so a colour names one object; the background is a plain
grey, never named.  Related objects lie in opposite halves of the canvas.

Known limit of the shipped model: it binds colours to shapes and follows a relation's axis
(left/right versus above/below) but not its direction (which object comes first): the
causal CLIP text encoder sees the relation word only after the first object.  Commit
132f29e holds a language that puts a side word after each object ("a red circle on the
left and a blue square on the right"), ready for a next training run.
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
SHAPES = ["circle", "square", "triangle", "cross"]
RELATIONS = ["left of", "right of", "above", "below"]
TEMPLATES = {
    "single": "a {colour} {shape}",
    "relation": "a {colour} {shape} {relation} a {colour2} {shape2}",
    "and": "a {colour} {shape} and a {colour2} {shape2}",
}
# share of each template in the training data and in held-out evaluation sets
TEMPLATE_WEIGHTS = {"single": 0.2, "relation": 0.65, "and": 0.15}
T_SINGLE, T_RELATION, T_AND = 0, 1, 2
TEMPLATE_NAMES = ["single", "relation", "and"]

# the closed vocabulary, in token order after the special tokens
WORDS = ["a", "and", "of", "left", "right", "above", "below"] + COLOURS + SHAPES
MAX_TOKENS = 16  # tokenizer model_max_length: bos + at most 9 words + eos, padded

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
    if template == T_SINGLE:
        return f"a {COLOURS[colour[0]]} {SHAPES[shape[0]]}"
    link = RELATIONS[relation] if template == T_RELATION else "and"
    return (f"a {COLOURS[colour[0]]} {SHAPES[shape[0]]} {link} "
            f"a {COLOURS[colour[1]]} {SHAPES[shape[1]]}")


def parse(prompt: str) -> dict:
    """Parse a caption of the language into its parts; DlxError if it is not one."""
    from dlx.errors import DlxError

    words = prompt.strip().lower().replace(",", " ").split()
    rel_words = {"left": "left of", "right": "right of", "above": "above", "below": "below"}

    def obj(ws):
        if len(ws) != 3 or ws[0] != "a" or ws[1] not in COLOURS or ws[2] not in SHAPES:
            raise DlxError(f"not a caption of the shapes language: {prompt!r}")
        return {"colour": ws[1], "shape": ws[2]}

    if len(words) == 3:
        return {"template": "single", "objects": [obj(words)], "relation": None}
    if len(words) >= 7:
        first, rest = obj(words[:3]), words[3:]
        if rest[0] == "and":
            rel, tail = None, rest[1:]
        elif rest[0] in ("left", "right") and len(rest) > 1 and rest[1] == "of":
            rel, tail = rel_words[rest[0]], rest[2:]
        elif rest[0] in ("above", "below"):
            rel, tail = rest[0], rest[1:]
        else:
            raise DlxError(f"not a caption of the shapes language: {prompt!r}")
        second = obj(tail)
        if second["colour"] == first["colour"]:
            raise DlxError(f"the two objects of a caption must differ in colour: {prompt!r}")
        return {"template": "relation" if rel else "and", "objects": [first, second],
                "relation": rel}
    raise DlxError(f"not a caption of the shapes language: {prompt!r}")


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
    out = torch.where(shape == 0, d_circle, d_square)
    out = torch.where(shape == 2, d_triangle, out)
    out = torch.where(shape == 3, d_cross, out)
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
    pad = eos
    colour_ids = torch.tensor([wid(c) for c in COLOURS], device=dev)
    shape_ids = torch.tensor([wid(s) for s in SHAPES], device=dev)
    a = wid("a")
    rel_tokens = torch.tensor([[wid("left"), wid("of")], [wid("right"), wid("of")],
                               [wid("above"), pad], [wid("below"), pad]], device=dev)
    ids = torch.full((B, max_len), pad, dtype=torch.long, device=dev)
    ids[:, 0] = bos
    ids[:, 1] = a
    ids[:, 2] = colour_ids[scene.colour[:, 0]]
    ids[:, 3] = shape_ids[scene.shape[:, 0]]
    single = scene.template == T_SINGLE
    is_and = scene.template == T_AND
    two_word = scene.relation < 2
    # link words: "and" | "left of" | "above"
    link0 = torch.where(is_and, torch.full_like(single, wid("and"), dtype=torch.long),
                        rel_tokens[scene.relation, 0])
    n_link = torch.where(is_and | ~two_word, 1, 2)
    # build the tail of two-object captions position by position
    tail = torch.full((B, 7), pad, dtype=torch.long, device=dev)
    tail[:, 0] = link0
    tail[:, 1] = torch.where(n_link == 2, rel_tokens[scene.relation, 1], a)
    c1 = colour_ids[scene.colour[:, 1]]
    s1 = shape_ids[scene.shape[:, 1]]
    tail[:, 2] = torch.where(n_link == 2, a, c1)
    tail[:, 3] = torch.where(n_link == 2, c1, s1)
    tail[:, 4] = torch.where(n_link == 2, s1, eos)
    tail[:, 5] = torch.where(n_link == 2, eos, pad)
    ids[:, 4:11] = torch.where(single.view(B, 1), pad, tail)
    ids[:, 4] = torch.where(single, eos, ids[:, 4])
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
