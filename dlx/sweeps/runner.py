"""Running a sweep's missing rows: batches of rows through the engine, metrics, PNGs and previews
into the store, one transaction per row."""

from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .. import _diffusers as D
from .._io import atomic_write, png_bytes
from ..families import family_of
from ..protocol import Part
from ..recorder import Recorder
from . import engine
from .cost import Interleaved
from .store import _FULL_ERRNOS, disk_full, image_ok

__all__ = ["units", "measure_costs", "run", "recompute_metrics", "image_ok", "batch_key"]


def units(spec) -> list[list[dict]]:
    """Rows grouped by (steps, scale, prompt, seed), each group's reference row first."""
    cfgs = {c.name: c for c in spec.configs}
    refs = {c.name: spec.reference_of(c).name for c in spec.configs}
    units: dict = {}
    for r in spec.rows():
        c = cfgs[r["config"]]
        key = (spec.steps_of(c), spec.scale_of(c), r["prompt_index"], r["seed"])
        units.setdefault(key, []).append(r)
    out = []
    for key in sorted(units, key=lambda k: (k[0], k[1], k[2], k[3])):
        rows = units[key]
        rows.sort(key=lambda r: (refs[r["config"]] != r["config"],))  # reference first (stable)
        out.append(rows)
    return out


def measure_costs(pipe, spec, store, todo, batch, repeats):
    from . import cost

    for mode, steps, scale in todo:
        ctx = cost.compiled(pipe) if mode == "compiled" else cost.eager(pipe)
        with ctx:
            c = cost.measure(pipe, call=spec.call, prompt=spec.prompts[0], seed=spec.seeds[0], steps=steps,
                             scale=scale, batch=batch, repeats=repeats, warmup=2 if mode == "compiled" else 1)
        c["batch"] = batch
        store.set_cost(mode, steps, scale, batch, c)


def _is_compiled(pipe) -> bool:
    return D.is_compiled(getattr(pipe, family_of(pipe).denoiser))


class _Progress(Part):
    """Advances the sweep's bar as the denoising steps of a batch run: after step i of N, the
    batch's rows count as (i + 1) / N done (a bar that moved only when a batch finished showed
    one long call as "54.91 s/row" for a real 1.4 s/row). Reads nothing, changes nothing."""

    def __init__(self, bar, done: float, rows: int):
        self.bar, self.done, self.rows = bar, done, rows

    def on_step_end(self, run, step, timestep, callback_kwargs):
        if run.num_steps:
            _advance(self.bar, self.done + self.rows * min(1.0, (step + 1) / run.num_steps))
        return callback_kwargs


def _advance(bar, to: float) -> None:
    """Move the bar forward to ``to`` rows (never back: an out-of-memory retry reruns a batch)."""
    if to > bar.n + 1e-9:
        bar.update(to - bar.n)


def _bar(total: int, progress: bool):
    from tqdm.auto import tqdm

    # smoothing=0: the rate is rows done over time elapsed (batches of different sizes, the first
    # one paying warm-up, make a moving average of per-update rates swing); n is fractional
    return tqdm(total=total, unit="row", desc="sweep", disable=not progress, smoothing=0,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total_fmt} rows "
                           "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")


def run(pipe, spec, store, units, mets, *, max_batch, share, pad, keep_previews, progress, shard):
    dev = engine._device_of(pipe)
    limit = max_batch or engine.default_max_batch(dev)
    pad = _is_compiled(pipe) if pad is None else bool(pad)
    refs = {c.name: spec.reference_of(c).name for c in spec.configs}
    cfgs = {c.name: c for c in spec.configs}
    state = {"limit": limit, "done": 0,
             # what every row records it was computed with (store.REPRODUCIBILITY)
             "env": {"versions": _versions(), "device": str(dev), "dtype": _dtype_of(pipe),
                     "threads": torch.get_num_threads(), "shard": shard, "share": bool(share), "pad": pad}}
    shapes = D.ShapeLog()
    total = sum(len(u) for u in units)
    bar = _bar(total, progress)
    try:
        # Calls run rows of one step count; of several scales too where the pipeline's scale acts
        # only in the CFG combination (engine's docstring), else one scale per call (key: its scale).
        mix = engine.mixes_scales(pipe, spec.call)
        by_group: dict = {}
        for u in units:
            c = cfgs[u[0]["config"]]
            by_group.setdefault((spec.steps_of(c), None if mix else spec.scale_of(c)), []).append(u)
        timer = Interleaved(pipe, spec, store, padded=pad)  # the cost model, timed across the sweep too
        with D.pad_batch(getattr(pipe, family_of(pipe).denoiser), shapes, enabled=pad):
            for key, group_units in by_group.items():
                for batch in _batches(group_units, state):
                    _run_batch(pipe, spec, store, batch, mets, refs, state, keep_previews, dev, bar)
                    timer.after_batch(*key)
        if pad:
            store.event("shapes", padded_sizes=sorted(shapes.sizes), graphs=len(shapes.sizes))
    finally:
        bar.close()


def _dtype_of(pipe) -> str:
    try:
        return str(next(getattr(pipe, family_of(pipe).denoiser).parameters()).dtype)
    except (StopIteration, AttributeError, Exception):  # noqa: BLE001 - recorded as unknown
        return "?"


def batch_key(batch: list[dict], env: dict) -> str:
    """What a row's pixels depend on besides its own config, prompt and seed: the rows computed
    with it in one call, in order, and whether they shared a prefix or were padded."""
    text = "\n".join(r["row_id"] for r in batch) + f"|share={env['share']}|pad={env['pad']}"
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _batches(units: list[list[dict]], state: dict):
    """The rows of ``units`` as pipeline-call batches, each planned at ``state["limit"]`` as it
    is when that batch is due: an out-of-memory error while one runs lowers the limit for the
    batches after it too."""
    pending = [u for u in units if u]
    while pending:
        batch = engine.plan_batches(pending, state["limit"])[0]
        ids = {r["row_id"] for r in batch}
        pending = [u for u in ([r for r in u if r["row_id"] not in ids] for u in pending) if u]
        yield batch


def _run_batch(pipe, spec, store, batch, mets, refs, state, keep_previews, dev, bar):
    env = state["env"]
    try:
        extra, rec = [_Progress(bar, state["done"], len(batch))], None
        if keep_previews:
            rec = Recorder(pipe, keep=("x0",))
            extra.append(rec)
        res = engine.run_batch(pipe, spec, batch, share=env["share"], extra_parts=extra)
    except Exception as e:  # noqa: BLE001 - stored with the rows; KeyboardInterrupt passes
        if engine.is_oom(e) and len(batch) > 1:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            new = max(1, len(batch) // 2)
            store.event("oom", batch=len(batch), retry_with=new, error=str(e)[:300])
            state["limit"] = min(state["limit"], new)
            for piece in _batches([batch], state):
                _run_batch(pipe, spec, store, piece, mets, refs, state, keep_previews, dev, bar)
            return
        err = f"{type(e).__name__}: {e}"
        store.event("batch_failed", rows=len(batch), error=err[:500])
        key = batch_key(batch, env)
        for r in batch:
            _finish_row(store, r, None, err, {}, {}, None, None, None, len(batch), key, None, env)
        _done(bar, state, len(batch))
        return
    # scale: the rows' scale, or the sorted list of a mixed-scale call's (run at call_scale)
    store.event("batch", rows=len(batch), steps=res["steps"], scale=res["scale"], call_scale=res["call_scale"],
                evaluations=res["evaluations"], nfe_sum=float(sum(res["nfe"])), call_ms=res["call_ms"])
    images = res["images"]  # on the pipeline's device
    finite = torch.isfinite(images.flatten(1)).all(1).tolist()
    q8 = engine.to_uint8(images.clamp(0, 1))  # what the PNGs hold, on the device
    pixels = q8.cpu()
    key = batch_key(batch, env)
    # PNGs are encoded on threads (Pillow releases the GIL while it compresses) while the metrics
    # run: together they were most of a GPU sweep's wall time after its one pipeline call
    workers = min(len(batch), 8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pngs = [pool.submit(png_bytes, pixels[j]) if finite[j] else None for j in range(len(batch))]
        here = {(r["config"], r["prompt"], r["seed"]): j for j, r in enumerate(batch)}
        ref_idx = [here.get((refs[r["config"]], r["prompt"], r["seed"])) for r in batch]
        stored = [None if k is not None else _load_png(store, refs[r["config"]], r["prompt"], r["seed"])
                  for k, r in zip(ref_idx, batch)]
        values, errors = _metrics(mets, q8, batch, ref_idx, stored, finite, store)
        per_eval = res["evaluations"] / len(batch)
        previews = _previews(rec, len(batch)) if rec is not None else None
        for j, r in enumerate(batch):
            guided = res["guided"][j]
            if not finite[j]:
                err = "non-finite values (NaN/inf) in the decoded image"
                _finish_row(store, r, None, err, {}, {}, res["nfe"][j], per_eval, guided, len(batch), key,
                            res["call_ms"], env)
            else:
                if previews is not None:
                    _save_previews(store, r["row_id"], previews[j])
                _finish_row(store, r, pngs[j].result(), None, {m: values[m][j] for m in values}, errors[j],
                            res["nfe"][j], per_eval, guided, len(batch), key, res["call_ms"], env)
    _done(bar, state, len(batch))


def _done(bar, state, rows: int) -> None:
    state["done"] += rows
    _advance(bar, state["done"])


def _finish_row(store, r, png, error, metrics, metric_errors, nfe, evaluations, guided, batch, key, call_ms, env):
    image = store.write_image(r["row_id"], png) if png is not None else None
    store.add_row({"row_id": r["row_id"], "config": r["config"], "prompt": r["prompt"], "seed": r["seed"],
                   "status": "ok" if error is None else "failed", "error": error, "nfe": nfe,
                   "evaluations": evaluations, "guided_steps": guided, "metrics": metrics,
                   "metric_errors": metric_errors, "image": image, "batch": batch, "batch_key": key,
                   "call_ms": call_ms, "device": env["device"], "dtype": env["dtype"], "threads": env["threads"],
                   "versions": env["versions"], "shard": env["shard"]})


def _read_png(p: Path):
    import numpy as np
    from PIL import Image

    with Image.open(p) as im:
        a = np.asarray(im.convert("RGB"))
    return torch.from_numpy(a.copy()).permute(2, 0, 1)  # uint8 (3, H, W), as the PNG holds it


def _load_png(store, config, prompt, seed):
    from .spec import row_key

    rid = row_key(config, prompt, seed)
    p = store.out / "images" / f"{rid}.png"
    if not image_ok(p) or store.status_of(rid) not in (None, "ok"):
        return None  # the reference failed (or lives in another shard's database, not yet merged)
    return _read_png(p).float() / 255


def _metrics(mets, q8, batch, ref_idx, stored, finite, store) -> tuple[dict, list[dict]]:
    """Each metric on the rows it can judge, and per row the metrics that failed on it
    (``{name: "Error: message"}``). ``q8``: the batch's uint8 images on the pipeline's device;
    a row's reference is row ``ref_idx[j]`` of the batch or, from an earlier batch, the stored
    PNG ``stored[j]`` (None: failed or not there). PSNR and SSIM run on the device (on a GPU they
    take milliseconds where the host took seconds); other metrics and user callables get CPU
    tensors. A metric that raises (or returns other than one number per image) leaves NaN, an
    event and the error on each row it was to judge: the sweep warns, ``<metric>_n`` in the
    summary counts the values behind each mean, and a rerun recomputes just that metric from the
    stored images."""
    prompts = [r["prompt"] for r in batch]
    views = {}
    errors: list[dict] = [{} for _ in batch]

    def images_on(dev):
        if dev not in views:
            views[dev] = q8.to(dev).float() / 255
        return views[dev]

    def ref(j, dev):
        k = ref_idx[j]
        if k is not None:
            return images_on(dev)[k] if finite[k] else None
        return None if stored[j] is None else stored[j].to(dev)

    out = {}
    for m in mets:
        dev = q8.device if m.on_device else torch.device("cpu")
        vals = [math.nan] * len(batch)
        refs_j = {j: ref(j, dev) for j in range(len(batch))} if m.reference else {}
        idx = [j for j in range(len(batch)) if finite[j] and (not m.reference or refs_j[j] is not None)]
        if idx:
            refs = torch.stack([refs_j[j] for j in idx]) if m.reference else None
            try:
                got = m(images_on(dev)[idx], [prompts[j] for j in idx], refs)
            except Exception as e:  # noqa: BLE001 - a metric's failure leaves NaN, an event and the error per row
                err = f"{type(e).__name__}: {e}"[:500]
                store.event("metric_failed", metric=m.name, rows=len(idx), error=err)
                got = [math.nan] * len(idx)
                for j in idx:
                    errors[j][m.name] = err
            for j, v in zip(idx, got):
                vals[j] = v
        out[m.name] = vals
    return out, errors


def recompute_metrics(store, spec, mets, todo: dict, chunk: int = 32) -> int:
    """Compute metrics again from the stored PNGs, without the model: ``todo`` maps a metric's
    name to the ids of ok rows whose value failed (or was made by a metric whose code changed
    while every stored value of it was NaN). The PNGs hold exactly the uint8 pixels the first
    computation judged, so the values are what it would have given. Returns rows updated."""
    by_name = {m.name: m for m in mets}
    refs = {c.name: spec.reference_of(c).name for c in spec.configs}
    rows = {r["row_id"]: r for r in store.rows()}
    updated = 0
    for name, ids in todo.items():
        m = by_name[name]
        ids = [i for i in sorted(ids) if i in rows and rows[i]["status"] == "ok" and rows[i]["image"]
               and image_ok(store.out / rows[i]["image"])]
        for k in range(0, len(ids), chunk):
            batch = [rows[i] for i in ids[k:k + chunk]]
            q8 = torch.stack([_read_png(store.out / r["image"]) for r in batch])
            stored = [_load_png(store, refs[r["config"]], r["prompt"], r["seed"]) if m.reference else None
                      for r in batch]
            values, errors = _metrics([m], q8, batch, [None] * len(batch), stored, [True] * len(batch), store)
            updates = []
            for j, r in enumerate(batch):
                r["metrics"][name] = values[name][j]
                r["metric_errors"].pop(name, None)
                r["metric_errors"].update(errors[j])
                updates.append((r["row_id"], r["metrics"], r["metric_errors"]))
            store.set_metrics(updates)
            updated += len(batch)
    if updated:
        store.event("metrics_recomputed", rows=updated, metrics=sorted(todo))
    return updated


def _previews(rec, batch: int):
    """Per sample, uint8 (steps, 128, 128, 3) x0 previews from the recorder's trace: one batched
    render (``dlx.render.render_steps``: the model's own small VAE for the zoo models, else the
    family's latent-RGB map), each image enlarged to 128 px with sharp blocks (``to_pil``)."""
    import numpy as np

    from ..render import render_steps, to_pil

    rgb = render_steps(rec.trace, "x0")  # (steps, samples, H, W, 3)
    return [torch.from_numpy(np.stack([np.asarray(to_pil(rgb[i, j], 128)) for i in range(rgb.shape[0])]))
            for j in range(batch)]


def _save_previews(store, row_id, t):

    from safetensors.torch import save_file

    d = store.out / "previews"
    try:
        d.mkdir(exist_ok=True)
        atomic_write(d / f"{row_id}.safetensors", lambda tmp: save_file({"x0": t.contiguous()}, tmp), fsync=False)
    except OSError as e:
        if e.errno in _FULL_ERRNOS:
            raise disk_full(d / f"{row_id}.safetensors", e) from None
        raise


def _versions() -> dict:
    import diffusers

    from .. import __version__

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "dlx": __version__}
