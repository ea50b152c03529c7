"""Running a sweep's missing rows: batches of rows through the engine, metrics, PNGs and previews
into the store, one transaction per row."""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from .. import _diffusers as D
from .._io import atomic_write, png_bytes
from ..families import family_of
from . import engine

__all__ = ["units", "measure_costs", "run"]


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


def run(pipe, spec, store, units, mets, *, max_batch, share, pad, keep_previews, progress, shard):
    from tqdm.auto import tqdm

    dev = engine._device_of(pipe)
    limit = max_batch or engine.default_max_batch(dev)
    pad = _is_compiled(pipe) if pad is None else bool(pad)
    refs = {c.name: spec.reference_of(c).name for c in spec.configs}
    cfgs = {c.name: c for c in spec.configs}
    versions = _versions()
    state = {"limit": limit}
    shapes = D.ShapeLog()
    total = sum(len(u) for u in units)
    bar = tqdm(total=total, unit="row", desc="sweep", disable=not progress)
    try:
        # Calls run rows of one step count; of several scales too where the pipeline's scale acts
        # only in the CFG combination (engine's docstring), else one scale per call (key: its scale).
        mix = engine.mixes_scales(pipe, spec.call)
        by_group: dict = {}
        for u in units:
            c = cfgs[u[0]["config"]]
            by_group.setdefault((spec.steps_of(c), None if mix else spec.scale_of(c)), []).append(u)
        with D.pad_batch(getattr(pipe, family_of(pipe).denoiser), shapes, enabled=pad):
            for key, group_units in by_group.items():
                for batch in _batches(group_units, state):
                    _run_batch(pipe, spec, store, batch, mets, refs, state, share, keep_previews, versions,
                               dev, shard, bar)
        if pad:
            store.event("shapes", padded_sizes=sorted(shapes.sizes), graphs=len(shapes.sizes))
    finally:
        bar.close()


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


def _run_batch(pipe, spec, store, batch, mets, refs, state, share, keep_previews, versions, dev, shard, bar):
    try:
        extra, rec = [], None
        if keep_previews:
            import dlx

            rec = dlx.Recorder(pipe, keep=("x0",))
            extra.append(rec)
        res = engine.run_batch(pipe, spec, batch, share=share, extra_parts=extra)
    except Exception as e:  # noqa: BLE001 - stored with the rows; KeyboardInterrupt passes
        if engine.is_oom(e) and len(batch) > 1:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            new = max(1, len(batch) // 2)
            store.event("oom", batch=len(batch), retry_with=new, error=str(e)[:300])
            state["limit"] = min(state["limit"], new)
            for piece in _batches([batch], state):
                _run_batch(pipe, spec, store, piece, mets, refs, state, share, keep_previews, versions, dev, shard, bar)
            return
        err = f"{type(e).__name__}: {e}"
        store.event("batch_failed", rows=len(batch), error=err[:500])
        for r in batch:
            _finish_row(store, r, None, err, {}, None, None, None, len(batch), None, dev, versions, shard)
            bar.update(1)
        return
    # scale: the rows' scale, or the sorted list of a mixed-scale call's (run at call_scale)
    store.event("batch", rows=len(batch), steps=res["steps"], scale=res["scale"], call_scale=res["call_scale"],
                evaluations=res["evaluations"], nfe_sum=float(sum(res["nfe"])), call_ms=res["call_ms"])
    images = res["images"]  # on the pipeline's device
    finite = torch.isfinite(images.flatten(1)).all(1).tolist()
    q8 = engine.to_uint8(images.clamp(0, 1))  # what the PNGs hold, on the device
    pixels = q8.cpu()
    # PNGs are encoded on threads (Pillow releases the GIL while it compresses) while the metrics
    # run: together they were most of a GPU sweep's wall time after its one pipeline call
    workers = min(len(batch), 8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pngs = [pool.submit(png_bytes, pixels[j]) if finite[j] else None for j in range(len(batch))]
        here = {(r["config"], r["prompt"], r["seed"]): j for j, r in enumerate(batch)}
        ref_idx = [here.get((refs[r["config"]], r["prompt"], r["seed"])) for r in batch]
        stored = [None if k is not None else _load_png(store, refs[r["config"]], r["prompt"], r["seed"])
                  for k, r in zip(ref_idx, batch)]
        values = _metrics(mets, q8, batch, ref_idx, stored, finite, store)
        per_eval = res["evaluations"] / len(batch)
        previews = _previews(rec, len(batch)) if rec is not None else None
        for j, r in enumerate(batch):
            guided = res["guided"][j]
            if not finite[j]:
                err = "non-finite values (NaN/inf) in the decoded image"
                _finish_row(store, r, None, err, {}, res["nfe"][j], per_eval, guided, len(batch), res["call_ms"],
                            dev, versions, shard)
            else:
                if previews is not None:
                    _save_previews(store, r["row_id"], previews[j])
                _finish_row(store, r, pngs[j].result(), None, {m: values[m][j] for m in values}, res["nfe"][j],
                            per_eval, guided, len(batch), res["call_ms"], dev, versions, shard)
            bar.update(1)


def _finish_row(store, r, png, error, metrics, nfe, evaluations, guided, batch, call_ms, dev, versions, shard):
    image = store.write_image(r["row_id"], png) if png is not None else None
    store.add_row({"row_id": r["row_id"], "config": r["config"], "prompt": r["prompt"], "seed": r["seed"],
                   "status": "ok" if error is None else "failed", "error": error, "nfe": nfe,
                   "evaluations": evaluations, "guided_steps": guided, "metrics": metrics, "image": image,
                   "batch": batch, "call_ms": call_ms, "device": str(dev), "versions": versions, "shard": shard})


def _load_png(store, config, prompt, seed):
    import numpy as np
    from PIL import Image

    from .spec import row_key

    rid = row_key(config, prompt, seed)
    p = store.out / "images" / f"{rid}.png"
    row = store.con.execute("SELECT status FROM rows WHERE row_id=?", (rid,)).fetchone()
    if not p.is_file() or (row is not None and row[0] != "ok"):
        return None  # the reference failed (or lives in another shard's database, not yet merged)
    with Image.open(p) as im:
        a = np.asarray(im.convert("RGB"))
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 255


def _metrics(mets, q8, batch, ref_idx, stored, finite, store) -> dict:
    """Each metric on the rows it can judge. ``q8``: the batch's uint8 images on the pipeline's
    device; a row's reference is row ``ref_idx[j]`` of the batch or, from an earlier batch, the
    stored PNG ``stored[j]`` (None: failed or not there). PSNR and SSIM run on the device (on a
    GPU they take milliseconds where the host took seconds); other metrics and user callables
    get CPU tensors."""
    prompts = [r["prompt"] for r in batch]
    views = {}

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
            except Exception as e:  # noqa: BLE001 - a metric's failure leaves NaN and an event
                store.event("metric_failed", metric=m.name, error=f"{type(e).__name__}: {e}"[:500])
                got = [math.nan] * len(idx)
            for j, v in zip(idx, got):
                vals[j] = v
        out[m.name] = vals
    return out


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
    d.mkdir(exist_ok=True)
    atomic_write(d / f"{row_id}.safetensors", lambda tmp: save_file({"x0": t.contiguous()}, tmp), fsync=False)


def _versions() -> dict:
    import diffusers

    from .. import __version__

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "dlx": __version__}
