"""``dlx.sweep``: check everything, open the store, run the missing rows, return the results."""

from __future__ import annotations

import difflib
import inspect
import json
import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..errors import DlxError
from . import engine
from .result import SweepResult
from .shard import ranks, shard_paths, split
from .spec import build_spec
from .store import Store, check_out

__all__ = ["sweep", "load_pipeline", "model_identity", "weights_fingerprint"]


# -- the model --------------------------------------------------------------------------------------
def _check_device(device):
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DlxError(f"argument `device` must name a torch device ('cpu', 'cuda', 'cuda:1'); got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DlxError(f"argument `device` is {device!r} but CUDA is not available on this machine")
    return dev


def _check_model(model: str, arg: str = "model") -> dict:
    if not isinstance(model, str) or not model.strip():
        raise DlxError(f"argument `{arg}` must be 'shapes', a pipeline folder or a hub id; got {model!r}")
    if model == "shapes":
        return {"name": "shapes"}
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise DlxError(f"argument `{arg}`: {model!r} is a folder without model_index.json (not a saved pipeline)")
        return {"folder": str(p.resolve())}
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        return {"hub": model}
    raise DlxError(f"argument `{arg}`: {model!r} is neither 'shapes', a pipeline folder nor a hub id (org/name)")


def _check_dtype(dtype):
    """None, a floating torch dtype or its name ('float16', 'bfloat16', ...)."""
    if dtype is None:
        return None
    d = dtype
    if isinstance(dtype, str):
        d = getattr(torch, dtype, None) if dtype and not dtype.startswith("_") else None
    if not isinstance(d, torch.dtype) or not d.is_floating_point:
        raise DlxError(f"argument `dtype` must be a floating torch dtype or its name ('float32', 'float16', "
                       f"'bfloat16'); got {dtype!r}")
    return d


def load_pipeline(model: str, device=None, dtype=None):
    """The pipeline a spec names: 'shapes' (dlx.zoo), a folder saved by ``save_pretrained`` (offline),
    or a hub id (only when the hub is reachable; otherwise the local cache)."""
    import os

    ident = _check_model(model)
    dev = _check_device(device) or torch.device("cpu")
    dtype = _check_dtype(dtype)
    if "name" in ident:
        from .. import zoo

        return zoo.load("shapes", device=dev, dtype=dtype or torch.float32)
    from diffusers import DiffusionPipeline

    from .._quiet import no_load_bars

    offline = "folder" in ident or os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        with no_load_bars():
            pipe = DiffusionPipeline.from_pretrained(ident.get("folder") or ident["hub"], dtype=dtype or torch.float32,
                                                     local_files_only=offline)
    except (OSError, ValueError, EnvironmentError) as e:
        raise DlxError(f"argument `model`: could not load {model!r} ({'offline' if offline else 'hub'}): {e}") from e
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dev)


def model_identity(pipe) -> dict:
    """What the store records about a pipeline object (compared on resume)."""
    from ..families import family_of

    fam = family_of(pipe)
    den = getattr(pipe, fam.denoiser)
    name = str(getattr(getattr(pipe, "config", {}), "_name_or_path", "") or getattr(pipe, "name_or_path", "") or "")
    try:
        dtype = str(next(den.parameters()).dtype)
    except StopIteration:  # pragma: no cover
        dtype = "?"
    from .. import zoo

    if name and Path(name).resolve() == zoo.path("shapes").resolve():
        name = "shapes"
    sched = getattr(pipe, "scheduler", None)
    conf = _public_config(getattr(sched, "config", {}))
    if name == "shapes" and type(pipe).__name__ == "StableDiffusionPipeline" and _is_shipped_scheduler(sched, conf):
        # dlx.zoo.load("shapes") as shipped: the same sweep as dlx.sweep("shapes", ...) at this dtype
        # (the weights' fingerprint still tells a changed model apart)
        return {"name": "shapes", "dtype": dtype}
    return {"pipeline": type(pipe).__name__, "name_or_path": name, "dtype": dtype,
            "scheduler": type(sched).__name__,
            # its config too: the same class with another timestep_spacing or beta schedule
            # makes other images
            "scheduler_config": conf}


def _public_config(config) -> dict:
    """A diffusers config without its private ``_`` keys, as JSON stores it (tuples as lists)."""
    conf = {k: v for k, v in dict(config or {}).items() if not k.startswith("_")}
    return json.loads(json.dumps(conf, sort_keys=True, default=str))


def _is_shipped_scheduler(sched, conf: dict) -> bool:
    """Whether ``sched`` is the embedded model's scheduler as shipped (class and config)."""
    from .. import zoo

    try:
        shipped = json.loads((zoo.path("shapes") / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError):  # pragma: no cover - the package's own file
        return False
    if type(sched).__name__ != shipped.get("_class_name"):
        return False
    return _public_config(type(sched).from_config(shipped).config) == conf


def weights_fingerprint(pipe, per_tensor: int = 256) -> str | None:
    """A fingerprint of a pipeline's weights (or of one torch module's: a metric's network),
    compared when a sweep resumes: SHA-256 over every module component's parameters and
    buffers (by component name, in module order), each tensor's shape, dtype and
    ``per_tensor`` values taken at an even stride through it (as float32).

    A sample, not a full hash, so it stays cheap on a multi-GB model (one small gather per
    tensor, one copy to the host per component): fine-tuned or LoRA-fused weights, another
    checkpoint under the same name, an added adapter or a different dtype all change it; two
    sets of weights that differ only between the sampled values do not. None where weights
    cannot be read (offloaded to the ``meta`` device)."""
    import hashlib

    comps = {"": pipe} if isinstance(pipe, torch.nn.Module) else getattr(pipe, "components", None)
    if not isinstance(comps, dict):
        raise DlxError(f"argument `pipe` must be a diffusers pipeline (with .components) or a torch module; "
                       f"got {pipe!r}")
    if isinstance(per_tensor, bool) or not isinstance(per_tensor, int) or per_tensor < 1:
        raise DlxError(f"argument `per_tensor` must be a positive int; got {per_tensor!r}")
    h = hashlib.sha256()
    for name in sorted(comps):
        mod = comps[name]
        if not isinstance(mod, torch.nn.Module):
            continue
        samples = []
        for t in list(mod.parameters()) + list(mod.buffers()):
            if t.is_meta:
                return None
            flat = t.detach().reshape(-1)
            stride = max(1, flat.numel() // per_tensor)
            samples.append(flat[::stride][:per_tensor].to(torch.float32))
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        if samples:
            by_dev: dict = {}
            for x in samples:
                by_dev.setdefault(x.device, []).append(x)
            for xs in by_dev.values():
                h.update(torch.cat(xs).cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def _check_weights(out: Path, fp: str | None) -> None:
    """Record the weights' fingerprint in ``out``, or refuse weights that differ from the stored."""
    if fp is None:
        return
    s = Store(out)
    try:
        old = s.meta("weights")
        if old is None:
            s.set_meta("weights", fp)
        elif old != fp:
            raise DlxError(f"argument `pipe`: its weights differ from those that made the rows in {str(out)!r} "
                           f"(fingerprint stored {old}, given {fp}: another checkpoint, fine-tuned or "
                           f"LoRA-fused weights, or an added adapter); use another `out` folder")
    finally:
        s.close()


def _pipeline_class(pipe, ident: dict):
    """The pipeline's class, without loading weights where the model is given by name (its
    model_index.json); None where that cannot be read (the call is then checked once loaded)."""
    if not isinstance(pipe, str):
        return type(pipe)
    if "name" in ident:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline  # dlx.zoo.load
    import diffusers

    try:
        if "folder" in ident:
            name = json.loads((Path(ident["folder"]) / "model_index.json").read_text())["_class_name"]
        else:  # a hub id: its model_index.json (the local cache when offline), no weights
            name = diffusers.DiffusionPipeline.load_config(
                ident["hub"], local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1")["_class_name"]
    except Exception:  # noqa: BLE001 - unknown here; the load says why, and the call is checked then
        return None
    return getattr(diffusers, name, None)


#: the defaults dlx.sweep used before it read the pipeline's own (kept where they agree, so a
#: stored spec stays the same)
FALLBACK_DEFAULTS = {"guidance_scale": 7.5, "num_inference_steps": 50}


def _check_call(cls, call: dict, *, guidance_scales=None, steps=None) -> dict:
    """``call`` checked against ``cls.__call__``'s parameters (a misspelt argument would be
    swallowed by diffusers' ``**kwargs`` and the call would run with the default), with the
    pipeline's own defaults of ``guidance_scale`` and ``num_inference_steps`` filled in where
    they differ from ``FALLBACK_DEFAULTS`` and none was given (SDXL's 5.0, SD3's 7.0 and 28)."""
    if cls is None:
        return call
    try:
        params = inspect.signature(cls.__call__).parameters
    except (TypeError, ValueError):  # pragma: no cover - not introspectable
        return call
    named = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"self"}
    if "num_inference_steps" not in named:  # not a diffusers signature (a wrapper passing **kwargs on)
        return call
    for k in call:
        if k not in named:
            near = difflib.get_close_matches(k, sorted(named), n=1)
            raise DlxError(f"pipeline argument `{k}` is not a parameter of {cls.__name__}.__call__"
                           + (f"; did you mean `{near[0]}`?" if near else ""))
    out = dict(call)
    given = {"guidance_scale": guidance_scales is not None, "num_inference_steps": steps is not None}
    for k, fallback in FALLBACK_DEFAULTS.items():
        d = params[k].default if k in params else None
        if k not in out and not given[k] and isinstance(d, (int, float)) and not isinstance(d, bool) and d != fallback:
            out[k] = d
    return out


def _is_shapes(ident: dict) -> bool:
    return ident.get("name") == "shapes" or ident.get("name_or_path") == "shapes"


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
            call per scale (``dlx.sweep.engine``).
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
    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
        raise DlxError(f"argument `max_batch` must be a positive int or None; got {max_batch!r}")
    if "compiled" in timing and (dev or torch.device("cpu")).type != "cuda" and (
            not callable(pipe) or engine._device_of(pipe).type != "cuda"):
        raise DlxError("argument `timing`: 'compiled' (CUDA graphs) needs a CUDA device")
    call = _check_call(_pipeline_class(pipe, ident), call, guidance_scales=guidance_scales, steps=steps)
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
    out = check_out(out)

    # 2. the store: resume, or refuse a different spec
    rk = ranks()
    dev = rk.device(dev)
    main = Store(out)
    try:
        fresh = main.spec() is None
        main.bind(spec)
        info = {m.name: {"higher_is_better": m.higher_is_better, "reference": m.reference, "identity": m.identity}
                for m in mets}
        has_rows = bool(main.done_ids(include_failed=True))
        for name, old in (main.meta("metric_info") or {}).items():
            now_id, old_id = info.get(name, {}).get("identity"), old.get("identity")
            if has_rows and now_id is not None and old_id is not None and now_id != old_id:
                raise DlxError(f"argument `metrics`: metric {name!r} is not the one that made the values stored "
                               f"in {str(out)!r} (its {'code' if name not in ('lpips', 'clip') else 'network'} "
                               f"changed: {old_id} then, {now_id} now); use another `out` folder")
        main.set_meta("metric_info", info)
        if timing:
            main.set_meta("timing_batch", timing_batch)
        if rk.world == 1:
            for sp in shard_paths(out):  # a sharded run that stopped before its merge
                main.merge_from(sp)
                sp.unlink()
        done = main.done_ids(include_failed=not retry_failed)
        costs_have = {(c["mode"], c["steps"], c["scale"], c["batch"]) for c in main.costs()}
    finally:
        main.close()
    if not isinstance(pipe, str):
        _check_weights(out, weights_fingerprint(pipe))
    store = Store(out, rk.shard_db()) if rk.world > 1 else Store(out)
    try:
        done |= store.done_ids(include_failed=not retry_failed)
        costs_have |= {(c["mode"], c["steps"], c["scale"], c["batch"]) for c in store.costs()}
        units = _units(spec)
        mine = split(units, rk)
        # a unit whose reference row (its first) runs again runs whole: the other rows' PSNR,
        # SSIM and LPIPS were computed against the reference image (retry_failed after a failed
        # reference would otherwise leave them NaN beside a reference that is now fine)
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
                    _check_weights(out, weights_fingerprint(pipe))
                    _check_call(type(pipe), spec.call)  # a hub id's class is known only now
                elif dev is not None and engine._device_of(pipe) != dev:
                    raise DlxError(f"argument `device` is {str(dev)!r} but the pipeline is on "
                                   f"{str(engine._device_of(pipe))!r}; move it with pipe.to(...) or leave device out")
                if cost_todo:
                    _measure_costs(pipe, spec, store, cost_todo, timing_batch, timing_repeats)
                if todo_units:
                    _run(pipe, spec, store, todo_units, mets, max_batch=max_batch, share=share, pad=pad,
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
    return SweepResult(out)


def _units(spec) -> list[list[dict]]:
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


def _measure_costs(pipe, spec, store, todo, batch, repeats):
    from . import cost

    for mode, steps, scale in todo:
        ctx = cost.compiled(pipe) if mode == "compiled" else cost.eager(pipe)
        with ctx:
            c = cost.measure(pipe, call=spec.call, prompt=spec.prompts[0], seed=spec.seeds[0], steps=steps,
                             scale=scale, batch=batch, repeats=repeats, warmup=2 if mode == "compiled" else 1)
        c["batch"] = batch
        store.set_cost(mode, steps, scale, batch, c)


def _is_compiled(pipe) -> bool:
    from ..families import family_of

    den = getattr(pipe, family_of(pipe).denoiser)
    return type(den).__name__ == "OptimizedModule"


def _run(pipe, spec, store, units, mets, *, max_batch, share, pad, keep_previews, progress, shard):
    from tqdm.auto import tqdm

    dev = engine._device_of(pipe)
    limit = max_batch or engine.default_max_batch(dev)
    pad = _is_compiled(pipe) if pad is None else bool(pad)
    refs = {c.name: spec.reference_of(c).name for c in spec.configs}
    cfgs = {c.name: c for c in spec.configs}
    versions = _versions()
    state = {"limit": limit}
    shapes = engine.ShapeLog()
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
        with engine.pad_shapes(pipe, shapes, enabled=pad):
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
        pngs = [pool.submit(engine.png_bytes, pixels[j]) if finite[j] else None for j in range(len(batch))]
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
    import os

    from safetensors.torch import save_file

    d = store.out / "previews"
    d.mkdir(exist_ok=True)
    tmp = d / f".{row_id}.tmp"
    save_file({"x0": t.contiguous()}, str(tmp))
    os.replace(tmp, d / f"{row_id}.safetensors")


def _versions() -> dict:
    import diffusers

    from .. import __version__

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "dlx": __version__}
