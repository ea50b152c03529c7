"""``dlx.sweep``: check everything, open the store, run the missing rows, return the results."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .. import _args
from ..errors import DlxError
from . import engine
from . import runner
from .model import (_check_device, _check_dtype, _check_model, _is_shapes, _pipeline_class, check_call,
                    check_weights, load_pipeline, model_identity)
from ..fingerprint import weights_fingerprint
from .result import SweepResult
from .shard import ranks, shard_paths, split
from .spec import build_spec
from .store import DB, Store, check_out, disk_full, image_ok, is_disk_full

__all__ = ["sweep", "SweepWarning", "load_pipeline", "model_identity", "weights_fingerprint"]


# -- the sweep ----------------------------------------------------------------------------------------
def sweep(pipe, prompts=None, seeds=None, *, pairs=None, cutoffs=None, configs=None, guidance_scales=None, steps=None,
          metrics=None, networks=None, out=None, max_batch: int | None = None, timing=("eager",),
          timing_batch: int = 1, timing_repeats: int = 3, keep_previews: bool = False, retry_failed: bool = False,
          share: bool = True, pad: bool | None = None, progress: bool = True, device=None, dtype=None,
          **call) -> SweepResult:
    """Run every (config, prompt, seed) row of a grid and return its results (``SweepResult``).

    Args:
        pipe: a diffusers pipeline, or a model name: ``"shapes"`` (the embedded model), a folder
            saved with ``save_pretrained``, or a hub id (loaded only when rows are missing).
        prompts, seeds: every config runs on every prompt with every seed (default seeds 0-7);
            seed s draws the initial noise of ``torch.Generator().manual_seed(s)``, as a
            standalone call would. ``pairs=[(prompt, seed), ...]`` gives the pairs explicitly.
        cutoffs: CFG cutoff ratios in [0, 1] (one ``CFGCutoff(ratio=r)`` config each), or
        configs: ``{name: control | [controls] | None}`` built from ``CFGCutoff``,
            ``GuidanceInterval``, ``GuidanceSchedule`` (named schedules), ``AdaptiveCutoff``.
        guidance_scales, steps: lists crossed with the configs into the grid. Rows of one step
            count share pipeline calls whatever their scales (each sample guided at its own
            row's scale) where the pipeline's scale acts only in the CFG combination; else one
            call per scale (``dlx.sweeps.engine``).
        metrics: names (``psnr``, ``ssim``, ``lpips``, ``clip``, ``adherence``) or callables
            ``f(images, prompts, reference_images)`` (the full-guidance images of the same prompt
            and seed; None if the callable sets ``reference = False``; ``higher_is_better``
            likewise); default PSNR and SSIM against full guidance, plus adherence on the
            embedded model. ``networks``: the LPIPS / CLIP networks. A resume refuses a metric
            whose code (or network) changed since its values were stored.
        out: the results folder (SQLite + PNGs); the same spec on the same folder resumes, and
            weights that differ from those that made its rows are refused
            (``weights_fingerprint``). Default: a new temporary folder, kept (``res.out``).
        max_batch: rows per pipeline call (default by device; halved on CUDA out-of-memory).
        timing: cost-model modes to measure, ``("eager",)`` and/or ``"compiled"``; ``()`` for none.
        timing_batch: the batch size the predicted standalone time is for (default 1); the
            result's times are for the last call's (``res.timing_batch``).
        keep_previews: store per-step 128×128 x0 previews of every row (``res.previews(row_id)``).
        share: let rows of the same prompt and seed share their guided prefix (``dlx.Share``).
        pad: pad the denoiser batch to few shapes (default: when the denoiser is compiled).
        retry_failed: run the rows stored as failed again (with the rows compared with a
            failed reference, so their PSNR/SSIM are recomputed).
        **call: pipeline keyword arguments shared by every row (``num_inference_steps``,
            ``guidance_scale``, ``height``, ``negative_prompt``, ...), checked against the
            pipeline's ``__call__``. Where ``guidance_scale`` or ``num_inference_steps`` is not
            given, the pipeline's own default is used (SDXL 5.0; SD3 7.0 and 28 steps).

    Reproducibility (``dlx.sweeps.store.REPRODUCIBILITY``, also in the store's meta):
        Each row's image is within one level (1/255 per channel) of the same config run alone (one
        pipeline call for its prompt and seed) on the CPU in float32, and bitwise equal to it at
        max_batch=1 with the same thread count; bitwise between runs only at equal batch composition
        (the row's batch_key: the rows of its call, prefix sharing and padding), torch thread count,
        device, dtype and library versions, which each row records (threads, batch, batch_key,
        device, dtype, versions). Batched and multi-threaded reductions round differently, so a
        resume or a sharded run that computes a row in another batch or with other threads may move
        pixels by one level, and the metrics computed from them a little. Tested on the embedded
        model and the tiny test pipeline; on GPUs and in half precision no bound is tested.

    Failures are kept and said: a failed row is stored with its error, a metric that raises (or
    returns other than one number per image) leaves NaN and its error on the row; both end in a
    ``SweepWarning`` with the count and the first error, and a rerun with the same ``out``
    computes the failed metric values again from the stored images (without the model), and
    rows whose PNG is missing or damaged again.
    """
    from ..metrics import resolve

    # 1. everything checked before any model work
    if isinstance(pipe, str):
        ident = _check_model(pipe, "pipe")
    elif pipe is None or not callable(pipe):
        raise DlxError(f"argument `pipe` must be a diffusers pipeline or a model name ('shapes', a folder, a hub id); "
                       f"got {pipe!r}")
    else:
        ident = model_identity(pipe)
    dev = _check_device(device)
    dtype = _check_dtype(dtype)
    if dtype is not None and not isinstance(pipe, str):
        raise DlxError(f"argument `dtype` applies when the sweep loads the model (pipe given by name); got {dtype!r} "
                       f"with a pipeline object: convert it with pipe.to(dtype) instead")
    if isinstance(pipe, str):
        ident["dtype"] = str(dtype or torch.float32)
    if metrics is None:
        metrics = ["psnr", "ssim"] + (["adherence"] if _is_shapes(ident) else [])
    mets = resolve(metrics, networks)
    if isinstance(timing, str):
        timing = (timing,)
    timing = tuple(timing or ())
    for m in timing:
        if m not in ("eager", "compiled"):
            raise DlxError(f"argument `timing` takes 'eager' and/or 'compiled'; got {m!r}")
    for name, v in (("timing_batch", timing_batch), ("timing_repeats", timing_repeats)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise DlxError(f"argument `{name}` must be a positive int; got {v!r}")
    for name, v in (("keep_previews", keep_previews), ("retry_failed", retry_failed), ("share", share),
                    ("progress", progress)):
        _args.boolean(name, v)
    if pad is not None:
        _args.boolean("pad", pad)
    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
        raise DlxError(f"argument `max_batch` must be a positive int or None; got {max_batch!r}")
    if "compiled" in timing and (dev or torch.device("cpu")).type != "cuda" and (
            not callable(pipe) or engine._device_of(pipe).type != "cuda"):
        raise DlxError("argument `timing`: 'compiled' (CUDA graphs) needs a CUDA device")
    call = check_call(_pipeline_class(pipe, ident), call, guidance_scales=guidance_scales, steps=steps)
    spec = build_spec(prompts=prompts, seeds=seeds, pairs=pairs, cutoffs=cutoffs, configs=configs,
                      guidance_scales=guidance_scales, steps=steps, metrics=[m.name for m in mets], call=call,
                      model=ident)
    if any(m.name == "adherence" for m in mets):
        from ..zoo.shapes_data import parse

        for p in spec.prompts:
            try:
                parse(p)
            except DlxError as e:
                raise DlxError(f"argument `prompts`: metric 'adherence' judges captions of the embedded model's "
                               f"language; {p!r} is not one ({e}). See dlx.zoo.info('shapes')") from None
    if out is None:
        out = tempfile.mkdtemp(prefix="dlx-sweep-")
    try:
        out = check_out(out)
    except DlxError:
        finished = _finished_read_only(out, spec)  # an archive, a read-only share: nothing to compute
        if finished is None:
            raise
        return finished

    # 2. the store: resume, or refuse a different spec
    rk = ranks()
    dev = rk.device(dev)
    try:
        return _run(pipe, spec, mets, out, rk, dev, dtype, timing, timing_batch, timing_repeats, max_batch, share, pad,
                    keep_previews, retry_failed, progress)
    except OSError as e:  # a full disk where the store's own translation did not see it
        if is_disk_full(e):
            raise disk_full(out, e) from None
        raise


def _run(pipe, spec, mets, out, rk, dev, dtype, timing, timing_batch, timing_repeats, max_batch, share, pad,
         keep_previews, retry_failed, progress):
    main = Store(out)
    try:
        fresh = main.spec() is None
        main.bind(spec)
        info = {m.name: {"higher_is_better": m.higher_is_better, "reference": m.reference, "identity": m.identity}
                for m in mets}
        if rk.world == 1:
            for sp in shard_paths(out):  # a sharded run that stopped before its merge
                main.merge_from(sp)
                sp.unlink()
        stored_rows = main.rows()
        stale = _stale_metrics(stored_rows, main.meta("metric_info") or {}, info, out)
        main.set_meta("metric_info", info)
        if timing:
            main.set_meta("timing_batch", timing_batch)
        done = {r["row_id"] for r in stored_rows if _is_done(r, out, retry_failed, keep_previews)}
        lost = sorted(r["row_id"] for r in stored_rows if r["status"] == "ok" and r["row_id"] not in done)
        if lost and rk.main:
            main.event("rows_recomputed", reason="image or previews missing or damaged", rows=lost[:100],
                       count=len(lost))
        costs_have = {(c["mode"], c["steps"], c["scale"], c["batch"]) for c in main.costs()}
    finally:
        main.close()
    if not isinstance(pipe, str):
        check_weights(out, weights_fingerprint(pipe))
    store = Store(out, rk.shard_db()) if rk.world > 1 else Store(out)
    try:
        if rk.world > 1:  # a rank's own database, from a sharded run that stopped before its merge
            done |= {r["row_id"] for r in store.rows() if _is_done(r, out, retry_failed, keep_previews)}
        costs_have |= {(c["mode"], c["steps"], c["scale"], c["batch"]) for c in store.costs()}
        units = runner.units(spec)
        mine = split(units, rk)
        # a unit whose reference row (its first) runs again runs whole: the other rows' PSNR,
        # SSIM and LPIPS were computed against the reference image (retry_failed after a failed
        # reference, or a lost reference image, would otherwise leave them NaN or compared with
        # an image that is no longer there)
        todo_units = [u if u[0]["row_id"] not in done else [r for r in u if r["row_id"] not in done] for u in mine]
        todo_units = [u for u in todo_units if u]
        groups = sorted({(spec.steps_of(c), spec.scale_of(c)) for c in spec.configs})
        cost_todo = [(m, n, s) for m in timing for (n, s) in groups
                     if (m, n, s, timing_batch) not in costs_have] if rk.main else []
        if todo_units or cost_todo:
            try:
                # 3. the model, only now
                if isinstance(pipe, str):
                    pipe = load_pipeline(pipe, device=dev, dtype=dtype)
                    check_weights(out, weights_fingerprint(pipe))
                    check_call(type(pipe), spec.call)  # a hub id's class is known only now
                elif dev is not None and engine._device_of(pipe) != dev:
                    raise DlxError(f"argument `device` is {str(dev)!r} but the pipeline is on "
                                   f"{str(engine._device_of(pipe))!r}; move it with pipe.to(...) or leave device out")
                if cost_todo:
                    runner.measure_costs(pipe, spec, store, cost_todo, timing_batch, timing_repeats)
                if todo_units:
                    runner.run(pipe, spec, store, todo_units, mets, max_batch=max_batch, share=share, pad=pad,
                               keep_previews=keep_previews, progress=progress, shard=rk.rank)
            except BaseException:
                # a fresh folder where nothing was computed (a model that would not load, a call
                # the pipeline refused while timing) is not bound to this spec: the corrected
                # call may use it
                if fresh and rk.world == 1:
                    store.forget_if_empty()
                raise
    finally:
        store.close()
    # 4. shards merge on rank 0
    if rk.world > 1:
        rk.barrier()
        if rk.main:
            main = Store(out)
            try:
                for sp in shard_paths(out):
                    main.merge_from(sp)
                    for f in (sp, Path(str(sp) + "-wal"), Path(str(sp) + "-shm")):
                        f.unlink(missing_ok=True)
                if (out / "shards").is_dir() and not any((out / "shards").iterdir()):
                    (out / "shards").rmdir()
            finally:
                main.close()
        rk.barrier()
    # 5. metric values that failed before (or whose metric changed while all were NaN): just the
    # metric, from the stored PNGs, once every shard is merged; then say what is incomplete
    if rk.main:
        redone = {r["row_id"] for r in spec.rows()} - done  # computed by this run, on any rank
        stale = {name: ids - redone for name, ids in stale.items()}
        stale = {name: ids for name, ids in stale.items() if ids}
        main = Store(out)
        try:
            if stale:
                runner.recompute_metrics(main, spec, mets, stale)
            _warn_incomplete(main.rows(), spec)
        finally:
            main.close()
    return SweepResult(out)


class SweepWarning(UserWarning):
    """A sweep finished with failed rows or failed metric values (named with their first error)."""


def _is_done(row: dict, out: Path, retry_failed: bool, keep_previews: bool) -> bool:
    """Whether a stored row stands: failed rows unless ``retry_failed``; an ok row only while its
    PNG (and its previews, where kept) is there and whole, so a deleted or damaged image is
    computed again on rerun instead of failing the report later."""
    if row["status"] != "ok":
        return not retry_failed
    if not row["image"] or not image_ok(out / row["image"]):
        return False
    return not keep_previews or (out / "previews" / f"{row['row_id']}.safetensors").is_file()


def _stale_metrics(rows: list[dict], old_info: dict, info: dict, out) -> dict:
    """Per metric, the ok rows whose stored value is to be computed again: those where it failed,
    and every row where the metric's code (or network) changed since its values were stored and
    every one of them is NaN (nothing computed by the old code is kept beside the new). A changed
    metric with real stored values is refused, as before."""
    stale: dict = {}
    for name, now in info.items():
        old_id, now_id = (old_info.get(name) or {}).get("identity"), now.get("identity")
        ok = [r for r in rows if r["status"] == "ok"]
        if rows and old_id is not None and now_id is not None and old_id != now_id:
            values = [r["metrics"].get(name) for r in ok]
            if any(v is not None and v == v for v in values):
                raise DlxError(f"argument `metrics`: metric {name!r} is not the one that made the values stored "
                               f"in {str(out)!r} (its {'code' if name not in ('lpips', 'clip') else 'network'} "
                               f"changed: {old_id} then, {now_id} now); use another `out` folder")
            stale[name] = {r["row_id"] for r in ok}
            continue
        failed = {r["row_id"] for r in ok if name in r["metric_errors"]}
        if failed:
            stale[name] = failed
    return stale


def _warn_incomplete(rows: list[dict], spec) -> None:
    """A warning for failed rows and one per failed metric, each with its count and first error
    (the command line prints them and exits non-zero)."""
    import sys
    import warnings

    # point the warning at the user's line, past dlx's own frames
    pkg, f, level = str(Path(__file__).resolve().parents[1]), sys._getframe(), 1
    while f is not None and str(Path(f.f_code.co_filename).resolve()).startswith(pkg):
        f, level = f.f_back, level + 1
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        warnings.warn(f"{len(failed)} of {len(spec.rows())} rows failed; first error: {failed[0]['error']}",
                      SweepWarning, stacklevel=level)
    for name in spec.metrics:
        bad = [r for r in rows if r["status"] == "ok" and name in r["metric_errors"]]
        if bad:
            ok = sum(r["status"] == "ok" for r in rows)
            warnings.warn(f"metric {name!r} failed on {len(bad)} of {ok} rows (NaN there); first error: "
                          f"{bad[0]['metric_errors'][name]}. Fix the metric and rerun the sweep with the same "
                          f"`out`: only the metric is computed again, from the stored images", SweepWarning,
                          stacklevel=level)


def _finished_read_only(out, spec) -> SweepResult | None:
    """The results in ``out`` when it cannot be written but holds this very sweep, finished: they
    are returned as they are (read-only). None where ``out`` holds no sweep; a DlxError where it
    holds another one, or this one unfinished (nothing could be computed there)."""
    p = Path(out).expanduser()
    if not (p / DB).is_file():
        return None
    res = SweepResult(p)
    diff = res.spec.diff(spec)
    if diff:
        raise DlxError(f"argument `out`: {str(p)!r} cannot be written and holds another sweep ({'; '.join(diff)}); "
                       f"use another `out` folder")
    failed = sum(r["status"] != "ok" for r in res._rows)
    if not res.complete or failed or res.missing_images:
        raise DlxError(f"argument `out`: {str(p)!r} cannot be written and its sweep is not finished "
                       f"({len(res._rows) - failed} of {len(res.spec.rows())} rows done); copy it somewhere "
                       f"writable to resume it")
    return res
