"""diffusers' guidance methods (``diffusers.guiders``) on every classic pipeline: ``dlx.Guider``.

diffusers 0.42 ships APG, CFG-Zero*, tangential CFG, frequency-decoupled and magnitude-aware
guidance as guider classes, but only its modular pipelines call them. ``dlx.Guider(guider)``
runs one on a ``StableDiffusionPipeline``, SDXL, SD3, ControlNet or Flux (true CFG) pipeline:
the denoiser tap evaluates each sample's conditional and unconditional predictions and the
guider's own ``forward`` combines them, with its state set per step (``set_state``). The maths
is diffusers' code, not a copy; the few places where diffusers 0.42.1 is broken are wrapped
and named below (``_Rule``, ``Guider.guidance``).

What dlx decides (a researcher comparing methods needs each one stated):

* **Scale.** A guider guides at its *own* ``guidance_scale`` (its config is the record). The
  call's ``guidance_scale`` only has to be > 1 so that the pipeline builds the unconditional
  batch (Flux: ``true_cfg_scale > 1`` and a negative prompt); otherwise the call is refused
  before it starts. A ``GuidanceSchedule`` in the same block is refused (it sets plain CFG's
  scale, which a guider does not read).
* **Rescale.** The guider's own ``guidance_rescale`` applies (inside its ``forward``). A call
  with ``guidance_rescale > 0`` is refused: give the rescale to the guider, so that one is applied.
* **Window.** The guider's ``start``/``stop`` keep diffusers' rule: step i is guided when
  ``int(start·N) ≤ i < int(stop·N)`` (floor). That differs from dlx's windows
  (``GuidanceInterval``, ``CFGCutoff``: ``⌊r·N + ½⌋``, round half up) and from diffusers'
  cutoff callbacks (which guide steps ``0 … ⌊r·N⌋``, one step more). Outside its window a guider
  needs one pass: the unconditional rows are not evaluated and the sample's prediction is the
  conditional one (diffusers' ``forward`` would also put it through its ``guidance_rescale``,
  a no-op up to rounding). ``report["guided_steps"]`` lists the steps per sample.
* **Composition** by the core's one rule: a sample is guided where every control guides it, so
  ``[dlx.Guider(apg), dlx.CFGCutoff(0.4)]`` is APG inside the cutoff's window (and inside the
  guider's own). At most one attached part sets the combination rule (``sets_rule``).
* **Per sample.** ``Guider([g0, g1, ...])`` gives each sample of the batch its own guider (one
  per sample, as the other controls take lists). A guider with state (APG's and
  AdaptiveProjectedMix's momentum) keeps it per sample and starts afresh every run.
* **CFG-Zero*'s zero-init steps** (``step < zero_init_steps``) run no denoiser pass at all:
  the prediction is exactly 0 and NFE counts 0 (diffusers 0.42.1 runs both passes there).

* **Perturbation guiders** (``PERTURBED``: PAG, SLG, SEG) need a third pass: the conditional
  rows through a perturbed denoiser. The guider's step plan asks for it (``Guide.perturb``); the
  tap runs it inside ``_Rule.perturbation``, which applies diffusers' own hooks
  (``diffusers.hooks``: layer skip, attention-score skip, smoothed energy) for that pass and then
  leaves every module of the denoiser as found (``_diffusers.modules_restored``); the guider's
  ``forward(cond, uncond, perturbed)`` combines. The perturbed pass follows the guider's own
  window, diffusers' ``int(start·N) < i < int(stop·N)`` (strict at both ends, so never step 0),
  and counts one NFE per sample (on Flux it runs beside the step's conditional call). dlx's windows (``CFGCutoff``, ``GuidanceInterval`` …) cut the
  unconditional pass only; where they do and the perturbed pass runs, the guider's own
  perturbed-only branch combines (``skip + s·(c − skip)``). Which run where is in
  ``dlx.families`` (``guider_support``); the others are refused before the call, naming the
  guider and the family, and so is a compiled denoiser (its graph would change every step).
* **AutoGuidance** runs its unconditional pass through the perturbed denoiser (Karras et al.'s
  "bad version" of the model, here diffusers' layer skips on the negative prompt's rows, as its
  modular pipelines do): the tap evaluates those rows inside ``_Rule.perturbation`` instead of in
  the main call, so NFE is CFG's. Only ``dropout=1.0``: diffusers' dropout < 1 draws at random
  from torch's global generator at every pass, and a run would not follow from its seed. SD3's own
  skip-layer guidance through the pipeline's ``skip_guidance_layers`` still works (the tap
  observes it); ``Guider(SkipLayerGuidance(...))`` equals it bitwise where the windows agree.

(Over 400 lines: one part, ``Guider``, and its rule; about half is the workarounds for diffusers
0.42.1's guider faults, each beside the code it corrects.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import numbers
import sys

import torch

from ._diffusers import is_compiled, modules_restored
from .config import defaults
from .errors import DlxError
from .families import PERTURBATION_GUIDERS, guider_support
from .guidance import GuidanceSchedule
from .protocol import Guide, Part

__all__ = ["Guider", "COMBINATION", "PERTURBED", "guider_from_config"]

#: the diffusers.guiders classes a ``Guider`` runs: rules on (cond, uncond) of one sample
COMBINATION = (
    "ClassifierFreeGuidance",
    "AdaptiveProjectedGuidance",
    "AdaptiveProjectedMixGuidance",
    "ClassifierFreeZeroStarGuidance",
    "TangentialClassifierFreeGuidance",
    "FrequencyDecoupledGuidance",
    "MagnitudeAwareGuidance",
)

# -- every touch of diffusers.guiders internals (diffusers 0.42.1), in one place -----------------
# tests/test_guiders.py checks each exists, so a diffusers that moves one fails loudly there.
_GUIDER_LOGGER = "diffusers.guiders.guider_utils"  # warns "experimental" on every construction


@contextlib.contextmanager
def _quiet_construction(module: str | None = None):
    """diffusers logs an "experimental feature" warning each time a guider is built (and PAG a
    "modifying the config" one, from its own module's logger); the user saw them when building
    theirs, and dlx's private copies would repeat them on every run."""
    loggers = [logging.getLogger(n) for n in (_GUIDER_LOGGER, module) if n]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _guider_classes() -> dict:
    import diffusers.guiders as G

    return {name: getattr(G, name) for name in dir(G)
            if isinstance(getattr(G, name), type) and issubclass(getattr(G, name), G.BaseGuidance)
            and name != "BaseGuidance"}


def _module_of(guider):
    return sys.modules[type(guider).__module__]


def _has_momentum(guider) -> bool:
    return type(guider).__name__ in ("AdaptiveProjectedGuidance", "AdaptiveProjectedMixGuidance") and \
        guider.config.get("adaptive_projected_guidance_momentum") is not None


def _needs_uncond(guider) -> bool:
    """diffusers' one answer to "how many passes at this step" (after ``set_state``)."""
    return guider.num_conditions >= 2


def _zero_init(guider) -> bool:
    """CFG-Zero*'s zero-init step (after ``set_state``): diffusers' ``forward`` returns zeros there
    (checked before its window), yet its ``num_conditions`` asks for both passes (0.42.1)."""
    return (type(guider).__name__ == "ClassifierFreeZeroStarGuidance" and guider._enabled
            and guider._step < guider.zero_init_steps)


# The guiders that evaluate a perturbed denoiser: class -> (the check of the window of the pass
# it perturbs, their hook configs, their hook names). PAG, SLG and SEG perturb a third pass of
# the conditional rows (their ``_is_cfg_enabled`` is the check of the unconditional pass);
# AutoGuidance perturbs the unconditional pass itself (the "bad version" of the model).
_PERTURBED = {
    "SkipLayerGuidance": ("_is_slg_enabled", "skip_layer_config", "_skip_layer_hook_names"),
    "PerturbedAttentionGuidance": ("_is_slg_enabled", "skip_layer_config", "_skip_layer_hook_names"),
    "SmoothedEnergyGuidance": ("_is_seg_enabled", "seg_guidance_config", "_seg_layer_hook_names"),
    "AutoGuidance": ("_is_ag_enabled", "auto_guidance_config", "_auto_guidance_hook_names"),
}
_UNCOND_PERTURBED = ("AutoGuidance",)
#: each one's constructor argument for those configs (what an error message tells the user to set)
_CONFIG_ARG = {"SkipLayerGuidance": "skip_layer_config", "PerturbedAttentionGuidance": "perturbed_guidance_config",
               "SmoothedEnergyGuidance": "seg_guidance_config", "AutoGuidance": "auto_guidance_config"}
#: the perturbation guiders a ``Guider`` runs where a family allows
PERTURBED = tuple(_PERTURBED)


def _perturb_on(guider) -> bool:
    """The perturbed pass runs at this step (after ``set_state``): diffusers' own window check,
    ``int(start·N) < i < int(stop·N)`` (strict at both ends, unlike the CFG window)."""
    return bool(getattr(guider, _PERTURBED[type(guider).__name__][0])())


def _cfg_on(guider) -> bool:
    """The unconditional pass runs at this step (after ``set_state``), for a perturbation guider
    (whose ``num_conditions`` counts the perturbed pass too)."""
    return bool(guider._is_cfg_enabled())


@contextlib.contextmanager
def _cfg_off(guider):
    """``forward`` with its unconditional term switched off: dlx's windows (``CFGCutoff`` …) cut a
    sample's unconditional pass while the guider's perturbed pass still runs, and diffusers'
    ``forward`` then takes its own perturbed-only branch."""
    guider._is_cfg_enabled = lambda: False  # an instance attribute shadows the method
    try:
        yield
    finally:
        del guider.__dict__["_is_cfg_enabled"]


def _hook_names(guider) -> list[str]:
    return list(getattr(guider, _PERTURBED[type(guider).__name__][2]))


def _apply_perturbation(guider, den) -> None:
    """diffusers' own hook helpers, as the guider's ``prepare_models`` calls them for its perturbed
    batch. Not ``prepare_models`` itself: in diffusers 0.42.1 SmoothedEnergyGuidance's never
    increments ``_count_prepared``, so it never applies its hooks (SEG guides with an unperturbed
    pass there); dlx applies them on the pass that needs them."""
    name = type(guider).__name__
    _, configs, names = _PERTURBED[name]
    if name == "SmoothedEnergyGuidance":
        from diffusers.hooks.smoothed_energy_guidance_utils import _apply_smoothed_energy_guidance_hook

        for hook, cfg in zip(getattr(guider, names), getattr(guider, configs)):
            if isinstance(cfg.indices, int):  # the same fault as the layer-skip configs' below
                cfg.indices = [cfg.indices]
            _apply_smoothed_energy_guidance_hook(den, cfg, guider.seg_blur_sigma, name=hook)
        return
    from diffusers.hooks.layer_skip import TransformerBlockSkipHook, _apply_layer_skip_hook

    hooks = getattr(guider, names)
    for hook, cfg in zip(hooks, getattr(guider, configs)):
        if isinstance(cfg.indices, int):
            # diffusers 0.42.1: SkipLayerGuidance(skip_layer_guidance_layers=[7, 8, 9]) and
            # AutoGuidance make one LayerSkipConfig(7) per layer, whose ``indices`` is then an int,
            # and the hook helper's ``len(config.indices)`` fails: dlx makes it the list [7]
            cfg.indices = [cfg.indices]
        _apply_layer_skip_hook(den, cfg, name=hook)
    if "return_hidden_states_index" in TransformerBlockSkipHook.new_forward.__code__.co_names:
        return  # a diffusers that reads the block's output order
    # diffusers 0.42.1: a skipped whole block returns (hidden_states, encoder_hidden_states)
    # whatever order the block returns them in; SD3's JointTransformerBlock returns (encoder,
    # hidden) (its registry metadata says so), so skip-layer guidance on SD3 fails with a shape
    # error. dlx swaps the pair back for such blocks.
    for m in den.modules():
        reg = m.__dict__.get("_diffusers_hook")
        if reg is None:
            continue
        for hook in hooks:
            h = reg.hooks.get(hook)
            meta = getattr(h, "_metadata", None)
            if (isinstance(h, TransformerBlockSkipHook) and math.isclose(h.dropout, 1.0) and meta is not None
                    and meta.return_encoder_hidden_states_index == 0 and meta.return_hidden_states_index == 1):
                h.fn_ref.post_forward = lambda module, out: (out[1], out[0])


def _fdg_mixed_levels(guider) -> bool:
    """FDG with some levels guided and others not at this step (after ``set_state``)."""
    on = [guider._is_fdg_enabled_for_level(i) for i in range(guider.levels)]
    return any(on) and not all(on)


def _fdg_forward(guider, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """FrequencyDecoupledGuidance.forward with a level switched off (diffusers 0.42.1 fault: its
    disabled-level branch appends ``pred_cond_freq``, a variable of the *previous* level: an
    UnboundLocalError when level 0 is off, a shape error or a wrong level otherwise; the fix
    was closed unmerged). Its own building blocks (pyramid, projection, rescale), the loop
    written as diffusers intends it: a switched-off level keeps the conditional prediction's."""
    m = _module_of(guider)
    pc = m.build_laplacian_pyramid_func(cond, guider.levels)
    pu = m.build_laplacian_pyramid_func(uncond, guider.levels)
    out = []
    params = zip(guider.guidance_scales, guider.parallel_weights, guider.guidance_rescale)
    for level, (scale, weight, rescale) in enumerate(params):
        c, u = pc[level], pu[level]
        if not guider._is_fdg_enabled_for_level(level):
            out.append(c)
            continue
        shift = c - u
        if not math.isclose(weight, 1.0):
            par, orth = m.project(shift, c, guider.upcast_to_double)
            shift = weight * par + orth
        pred = (c if guider.use_original_formulation else u) + scale * shift
        if guider.guidance_rescale_space == "freq" and rescale > 0.0:
            pred = m.rescale_noise_cfg(pred, c, rescale)
        out.append(pred)
    pred = m.build_image_from_pyramid(out)
    if guider.guidance_rescale_space == "data" and guider.guidance_rescale[0] > 0.0:
        pred = m.rescale_noise_cfg(pred, cond, guider.guidance_rescale[0])
    return pred


def _identity_apg_as_cfg(guider):
    """APG whose projection is the identity (``eta`` 1, no momentum, no norm threshold): the
    update is (c − u)'s orthogonal plus parallel part, c − u exactly in real arithmetic, but
    diffusers rounds the two parts to float32 apart and adds them (last-bit differences). dlx
    runs it as diffusers' ClassifierFreeGuidance with the same scale, rescale, formulation and
    window, so it equals CFG bitwise, as it does in exact arithmetic."""
    cfg = guider.config
    if not (type(guider).__name__ == "AdaptiveProjectedGuidance" and cfg["eta"] == 1
            and cfg["adaptive_projected_guidance_momentum"] is None
            and not cfg["adaptive_projected_guidance_rescale"] > 0):
        return None
    import diffusers.guiders as G

    with _quiet_construction():
        return G.ClassifierFreeGuidance(
            guidance_scale=cfg["guidance_scale"], guidance_rescale=cfg["guidance_rescale"],
            use_original_formulation=cfg["use_original_formulation"], start=cfg["start"], stop=cfg["stop"],
            enabled=cfg["enabled"])


# -- configurations --------------------------------------------------------------------------------


def _json(v):
    if hasattr(v, "to_dict") and type(v).__name__ in ("LayerSkipConfig", "SmoothedEnergyGuidanceConfig"):
        return _json(v.to_dict())  # the perturbation guiders' hook configs: rebuilt from dicts
    if isinstance(v, dict):
        return {str(k): _json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json(x) for x in v]
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    raise DlxError(f"guider configuration value {v!r} is not JSON (a LayerSkipConfig or other object)")


def _config_of(guider) -> dict:
    """The guider's ``register_to_config`` values as JSON (private keys dropped)."""
    return {k: _json(v) for k, v in guider.config.items() if not k.startswith("_")}


# FDG checks ``isinstance(x, float)`` for start, stop and guidance_rescale and calls ``min`` /
# ``len`` on anything else: an int (0 or 1 from a YAML file or JSON) fails (diffusers 0.42.1)
_FLOAT_ARGS = {"FrequencyDecoupledGuidance": ("start", "stop", "guidance_rescale", "parallel_weights")}


def guider_from_config(name, config=None):
    """A diffusers guider from its class name and ``register_to_config`` values (JSON)."""
    classes = _guider_classes()
    if not isinstance(name, str) or name not in classes:
        raise DlxError(f"argument `guider` must be a diffusers.guiders class name; got {name!r} "
                       f"(known: {sorted(classes)})")
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise DlxError(f"argument `config` must be a dict of {name}'s arguments; got {config!r}")
    kw = {k: v for k, v in config.items() if not k.startswith("_")}
    for k in _FLOAT_ARGS.get(name, ()):
        v = kw.get(k)
        if isinstance(v, numbers.Integral) and not isinstance(v, bool):
            kw[k] = float(v)
    if name == "AdaptiveProjectedGuidance" and isinstance(kw.get("adaptive_projected_guidance_norm_dim"), list):
        kw["adaptive_projected_guidance_norm_dim"] = tuple(kw["adaptive_projected_guidance_norm_dim"])
    try:
        with _quiet_construction(classes[name].__module__):
            return classes[name](**kw)
    except (TypeError, ValueError, ImportError) as e:
        raise DlxError(f"argument `config` does not build a {name}: {type(e).__name__}: {e}") from None


def _copy(guider):
    """A private copy (dlx sets its state every step; the user's instance is left alone)."""
    return guider_from_config(type(guider).__name__, _config_of(guider))


# -- the rule ------------------------------------------------------------------------------------


class _Rule:
    """One guider's combination rule, as the core calls it (``Guide.rule``): the guided samples it
    governs at a step, their conditional and unconditional rows in ``samples`` order."""

    def __init__(self, guider, name: str):
        self.guider = guider  # a private copy: its state is set every step
        self.name = name
        self.momentum = _has_momentum(guider)
        self.fdg = name == "FrequencyDecoupledGuidance"
        self.flatten = type(guider).__name__ == "MagnitudeAwareGuidance"
        self.perturbing = name in _PERTURBED and name not in _UNCOND_PERTURBED  # a third pass (SLG, PAG, SEG)
        #: the unconditional pass runs through the perturbed denoiser (AutoGuidance): the tap
        #: evaluates these samples' unconditional rows inside ``perturbation``
        self.perturbs_uncond = name in _UNCOND_PERTURBED
        self.running: dict[int, torch.Tensor] = {}  # per-sample momentum (APG, APG-Mix)
        self._modules: list | None = None  # the denoiser's modules (restored after a perturbed pass)
        #: equal for rules of the same guider class and configuration: what ``dlx.Share`` groups
        #: samples on, so two sweep rows of one guider share their guided prefix (taken now: the
        #: hook helpers rewrite a perturbation guider's layer configs in place)
        self.key = ("Guider", name, json.dumps(_config_of(guider), sort_keys=True))

    @property
    def stateful(self) -> bool:
        """Whether a sample's prediction depends on its own history (momentum): then ``dlx.Share``
        never evaluates it as another sample's copy (read by the run's layout)."""
        return bool(self.momentum)

    def reset(self) -> None:
        self.running = {}
        self._modules = None

    def set_state(self, run, step: int) -> None:
        self.guider.set_state(step, run.num_steps, run.t_of(step))

    def passes(self) -> tuple[bool, bool, bool]:
        """(unconditional pass, zero-init, perturbed pass) at the step of the last ``set_state``."""
        g = self.guider
        if self.perturbing:
            return _cfg_on(g), False, _perturb_on(g)
        if self.perturbs_uncond:
            return _perturb_on(g), False, False
        z = _zero_init(g)
        return not z and _needs_uncond(g), z, False

    @contextlib.contextmanager
    def perturbation(self, run):
        """The denoiser as the guider's perturbed model for one pass: diffusers' hooks applied to
        it, and every module left as found afterwards (``_diffusers.modules_restored``)."""
        den = getattr(run.pipe, run.family.denoiser)
        if self._modules is None:
            self._modules = list(den.modules())
        with modules_restored(self._modules, _hook_names(self.guider)):
            _apply_perturbation(self.guider, den)
            yield

    def combine(self, run, step: int, samples, cond: torch.Tensor, uncond, scale, perturbed=None) -> torch.Tensor:
        """The guided predictions of ``samples`` (the plan's ``scale`` is not read: a guider
        guides at its own ``guidance_scale``). A perturbation guider gets its perturbed pass's
        predictions as ``perturbed`` and ``uncond`` None where the unconditional pass did not run."""
        g = self.guider
        self.set_state(run, step)
        if self.perturbing:
            with _cfg_off(g) if uncond is None else contextlib.nullcontext():
                return g.forward(cond, uncond, perturbed).pred
        if self.fdg and _fdg_mixed_levels(g):
            return _fdg_forward(g, cond, uncond)
        buf = None
        if self.momentum:
            # diffusers keeps one buffer for the whole batch, made at step 0; dlx keeps each
            # sample's running average, so samples may leave and join (cutoffs, per-sample
            # windows) and a sample's momentum is what it would be alone. A new sample starts
            # at 0, as diffusers' buffer does (0·m + d == d exactly).
            buf = _module_of(g).MomentumBuffer(g.adaptive_projected_guidance_momentum)
            prev = [self.running.get(j) for j in samples]
            if any(p is not None for p in prev):
                buf.running_average = torch.stack(
                    [p if p is not None else torch.zeros_like(cond[i]) for i, p in enumerate(prev)])
            g.momentum_buffer = buf
        if self.flatten:
            # MagnitudeAwareGuidance takes ``torch.norm(x, dim=[1, 2, 3])``, which torch refuses
            # for more than two dims (p="fro" becomes a matrix norm): diffusers 0.42.1 fails on
            # every 4-D latent. Its maths reduces over all non-batch dims and is otherwise
            # elementwise, so it runs on the (B, −1) view and is reshaped back.
            return g.forward(cond.flatten(1), uncond.flatten(1)).pred.view_as(cond)
        pred = g.forward(cond, uncond).pred
        if buf is not None and isinstance(buf.running_average, torch.Tensor):
            for i, j in enumerate(samples):
                self.running[j] = buf.running_average[i]
            g.momentum_buffer = None
        return pred

    def __repr__(self):
        return f"<dlx guider rule {self.name}>"


# -- the part ------------------------------------------------------------------------------------


def _as_guider(value, where: str):
    import diffusers.guiders as G

    if isinstance(value, G.BaseGuidance):
        return value
    raise DlxError(f"argument `{where}` must be a diffusers.guiders instance "
                   f"(e.g. diffusers.guiders.AdaptiveProjectedGuidance(guidance_scale=7.5)); got {value!r}")


class Guider(Part):
    """A diffusers guider (``diffusers.guiders``) as a dlx part: its ``forward`` combines each
    sample's conditional and unconditional predictions, its ``start``/``stop`` window decides
    which steps need the unconditional pass (diffusers' rule ``int(start·N) ≤ i < int(stop·N)``).

    ``Guider(AdaptiveProjectedGuidance(guidance_scale=7.5, eta=0.0))``; ``Guider([g0, g1])`` (one
    guider per sample); ``Guider("AdaptiveProjectedGuidance", {"guidance_scale": 7.5})`` (by class
    name and config, as ``config()`` records it). Methods: CFG (Ho & Salimans 2022, arXiv
    2207.12598), APG (Sadat et al. 2024, arXiv 2410.02416), CFG-Zero* (Fan et al. 2025, arXiv
    2503.18886), TCFG (Kwon et al. 2025, arXiv 2503.18137), FDG (Sadat et al. 2025, arXiv
    2506.19713), MAMBO-G (arXiv 2508.03442); and with a third, perturbed pass PAG (Ahn et al.
    2024, arXiv 2403.17377), SLG (Stability AI, SD 3.5) and SEG (Hong 2024, arXiv 2408.00760);
    AutoGuidance (Karras et al. 2024, arXiv 2406.02507) with its unconditional pass perturbed;
    see the module docstring for scale, rescale, window, perturbed-pass and per-sample semantics.
    After a run ``report`` holds each sample's guider, the steps it guided, zeroed and perturbed,
    and the run's NFE.
    """

    #: the part decides how guided samples combine (at most one such part per block)
    sets_rule = True

    def __init__(self, guider, config=None):
        if isinstance(guider, str):
            self._names_given = True
            self.guiders = [guider_from_config(guider, config)]
            self.per_sample = False
        elif isinstance(guider, (list, tuple)):
            if not guider:
                raise DlxError("argument `guider` must be a guider or a non-empty list (one per sample); got []")
            if config is not None:
                if not isinstance(config, (list, tuple)) or len(config) != len(guider):
                    raise DlxError(f"argument `config` must be a list with one config per guider name; got {config!r}")
                self.guiders = [guider_from_config(n, c) for n, c in zip(guider, config)]
            else:
                self.guiders = [guider_from_config(g) if isinstance(g, str) else _as_guider(g, f"guider[{i}]")
                                for i, g in enumerate(guider)]
            self.per_sample = True
        else:
            if config is not None:
                raise DlxError("argument `config` is only for a guider given by class name")
            self.guiders = [_as_guider(guider, "guider")]
            self.per_sample = False
        for i, g in enumerate(self.guiders):
            name = type(g).__name__
            if name not in COMBINATION and name not in PERTURBATION_GUIDERS:
                where = "guider" if not self.per_sample else f"guider[{i}]"
                raise DlxError(f"argument `{where}`: {name} is not a guider dlx knows; it runs "
                               f"{list(COMBINATION) + list(PERTURBED)}")
            _config_of(g)  # every value JSON: checked now, not when a sweep stores it
            if name == "AutoGuidance" and any(not math.isclose(c.dropout, 1.0) for c in g.auto_guidance_config):
                raise DlxError(
                    f"argument `{'guider' if not self.per_sample else f'guider[{i}]'}`: AutoGuidance with dropout "
                    f"{[c.dropout for c in g.auto_guidance_config]} draws its weaker model at random at every pass "
                    f"(diffusers applies torch.nn.functional.dropout in training mode, from torch's global "
                    f"generator), so a run would not follow from its seed and a sweep row would not equal its "
                    f"config run alone: use dropout=1.0 (the layers skipped)")
        self.report: dict = {}
        self._rules: list[_Rule] = []
        self._per: list[int] = []  # sample -> index into _rules

    def __repr__(self):
        names = [type(g).__name__ for g in self.guiders]
        return f"Guider({names if self.per_sample else names[0]})"

    @property
    def guider(self):
        """The guider (the first one of a per-sample list)."""
        return self.guiders[0]

    def config(self) -> dict:
        """``{"type": "Guider", "args": {"guider": <class name>, "config": {<register_to_config
        values>}}}`` (lists, one per sample, for a per-sample Guider); ``dlx.part_from_config``
        rebuilds it."""
        names = [type(g).__name__ for g in self.guiders]
        cfgs = [_config_of(g) for g in self.guiders]
        if self.per_sample:
            return {"type": "Guider", "args": {"guider": names, "config": cfgs}}
        return {"type": "Guider", "args": {"guider": names[0], "config": cfgs[0]}}

    # -- checks before the call ----------------------------------------------------------------
    def on_run_start(self, run):
        self.report = {}
        fam = run.family
        for g in self.guiders:
            why = guider_support(fam, type(g).__name__)
            if why is not None:
                raise DlxError(why)
        perturbing = [g for g in self.guiders if type(g).__name__ in _PERTURBED]  # AutoGuidance too
        if perturbing:
            self._check_perturbation(run, perturbing)
        if any(isinstance(p, GuidanceSchedule) for p in getattr(run, "parts", ())):
            raise DlxError("a Guider guides at its guider's own guidance_scale; GuidanceSchedule sets plain CFG's "
                           "scale and would be ignored: attach one or the other (schedule a guider by its windows)")
        call = run.call
        rescale = call.get("guidance_rescale")
        if isinstance(rescale, numbers.Real) and rescale > 0:
            raise DlxError(f"the call's guidance_rescale={rescale!r} would be a second rescale beside the guider's: "
                           f"give it to the guider instead (e.g. ClassifierFreeGuidance(guidance_rescale={rescale!r}))")
        if fam.cfg == "calls":
            s = call.get("true_cfg_scale", 1.0)
            neg = call.get("negative_prompt") is not None or call.get("negative_prompt_embeds") is not None
            if not (isinstance(s, numbers.Real) and s > 1 and neg):
                raise DlxError(
                    f"a Guider needs the pipeline's unconditional pass: call {type(run.pipe).__name__} with "
                    f"true_cfg_scale > 1 and a negative_prompt (got true_cfg_scale={s!r}, negative prompt "
                    f"{'given' if neg else 'missing'}); the guider's own guidance_scale is the one it guides at")
        else:
            s = call.get("guidance_scale")
            den = getattr(run.pipe, fam.denoiser, None)
            if getattr(getattr(den, "config", None), "time_cond_proj_dim", None) is not None:
                raise DlxError(f"{type(run.pipe).__name__}'s denoiser embeds the guidance scale (time_cond_proj_dim, "
                               f"LCM-style) and the pipeline runs no unconditional pass: a Guider cannot act")
            if not (isinstance(s, numbers.Real) and s > 1):
                raise DlxError(
                    f"a Guider needs the pipeline's unconditional batch: call {type(run.pipe).__name__} with "
                    f"guidance_scale > 1 (got {s!r}); the guider's own guidance_scale is the one it guides at")

    def _check_perturbation(self, run, guiders) -> None:
        """Before the call: the denoiser can be perturbed as each guider asks (a dry run of its
        hooks on the denoiser, which is then left as found)."""
        fam = run.family
        den = getattr(run.pipe, fam.denoiser)
        pipe = type(run.pipe).__name__
        modules = list(den.modules())
        if is_compiled(den) or any(getattr(m, "_compiled_call_impl", None) is not None for m in modules):
            raise DlxError(f"{type(guiders[0]).__name__} changes {pipe}'s {fam.denoiser} for its perturbed pass at every "
                           f"step, which a compiled denoiser (torch.compile) would recompile each time: attach it to "
                           f"the uncompiled {fam.denoiser} (compiled in place or by region counts too)")
        from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS

        found = sorted(i for i in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS if hasattr(den, i))
        lists = [n for n, m in den.named_modules() if isinstance(m, torch.nn.ModuleList)
                 and n.endswith("transformer_blocks")]
        for g in guiders:
            trial = _copy(g)
            name = type(g).__name__
            arg = _CONFIG_ARG[name]  # the guider's argument for its hook configs
            configs = getattr(trial, _PERTURBED[name][1])
            auto = [c for c in configs if c.fqn == "auto"]
            if auto and len(found) > 1:
                # diffusers 0.42.1 takes the first of a set of names whose order changes from one
                # Python process to the next (string hashing): the perturbed blocks would too
                raise DlxError(f"{name}'s fqn=\"auto\" is ambiguous on {pipe}'s {fam.denoiser} "
                               f"({type(den).__name__} has {found}) and diffusers picks one in an order that changes "
                               f"between Python processes: name the blocks, e.g. {arg}={{'indices': [0], 'fqn': "
                               f"'{found[-1]}', ...}}")
            example = f"{arg}={{'indices': [0], 'fqn': '{lists[-1] if lists else 'transformer_blocks'}', ...}}"
            try:
                with modules_restored(modules, _hook_names(trial)):
                    _apply_perturbation(trial, den)
                    hooks = {h: sum(h in getattr(m.__dict__.get("_diffusers_hook"), "hooks", ()) for m in modules)
                             for h in _hook_names(trial)}
            except (ValueError, AttributeError, TypeError, KeyError) as e:
                raise DlxError(
                    f"{name} cannot perturb {pipe}'s {fam.denoiser} ({type(den).__name__}): diffusers "
                    f"says: {e} Its configs name the blocks by `fqn` and `indices` (\"auto\" finds a transformer's "
                    f"blocks only); this {fam.denoiser}'s transformer-block lists are {lists[:12]}: e.g. "
                    f"{example}") from None
            for cfg, h in zip(configs, _hook_names(trial)):
                blocks = den.get_submodule(cfg.fqn)
                missing = [i for i in cfg.indices if not 0 <= i < len(blocks)]
                if missing or not hooks[h]:
                    why = (f"indices {missing} are not blocks of its {len(blocks)}" if missing else
                           "diffusers' hooks found nothing to perturb in those blocks (no self-attention, "
                           "or neither attention nor feed-forward skipped)")
                    raise DlxError(f"argument `{arg}` of {name} ({cfg.to_dict()}) does not perturb {pipe}'s "
                                   f"{fam.denoiser}: {why}; the run would pay for a perturbed pass that changes "
                                   f"nothing. Its transformer-block lists are {lists[:12]}: e.g. {example}")

    def on_loop_start(self, run):
        b = run.batch
        if self.per_sample and len(self.guiders) != b:
            raise DlxError(f"argument `guider` has {len(self.guiders)} guiders (one per sample) but the run has "
                           f"{b} sample{'s' if b != 1 else ''}")
        # one private copy and rule per distinct guider instance; per-sample state lives in it
        rules: dict[int, int] = {}
        self._rules, self._per = [], []
        for j in range(b):
            g = self.guiders[j if self.per_sample else 0]
            if id(g) not in rules:
                rules[id(g)] = len(self._rules)
                copy = _copy(g)
                work = _identity_apg_as_cfg(copy) or copy
                self._rules.append(_Rule(work, type(g).__name__))
            self._per.append(rules[id(g)])
        self._steps: list[tuple] = []
        n = run.num_steps
        for i in range(n):  # each step's plan, from the guiders' own state
            flags = []
            for r in self._rules:
                r.set_state(run, i)
                flags.append(r.passes())
            mask, zero, pert = zip(*(flags[self._per[j]] for j in range(b)))
            self._steps.append((mask, zero, pert))
        self._last = max((i for i, (m, z, p) in enumerate(self._steps) if any(m) or any(z) or any(p)), default=-1)
        self._last_perturbed = max((i for i, (_, _, p) in enumerate(self._steps) if any(p)), default=-1)
        rule_of = tuple(self._rules[k] for k in self._per)
        # the scale each sample is guided at is its guider's (the record and the trace show it);
        # a guider with per-level scales (FDG) keeps the call's in the record
        own = [self._rules[k].guider.config.get("guidance_scale") for k in self._per]
        scale = tuple(float(s) if isinstance(s, numbers.Real) and not isinstance(s, bool) else run.call_scale()
                      for s in own)
        self._guides = [Guide(mask=m, scale=scale, rule=rule_of, zero=z if any(z) else None,
                              perturb=p if any(p) else None) for m, z, p in self._steps]
        self.report["guider"] = [self._rules[k].name for k in self._per]
        self.report["guidance_scale"] = [self._rules[k].guider.config.get("guidance_scale",
                                         self._rules[k].guider.config.get("guidance_scales")) for k in self._per]

    @classmethod
    def label_from_args(cls, args: dict, fmt_arg) -> str:
        """``Guider(AdaptiveProjectedGuidance(eta=0, guidance_scale=7.5))`` from ``config()["args"]``:
        each guider's class and the arguments that differ from its diffusers defaults (the stored
        configuration keeps them all); ``fmt_arg`` formats a value (``dlx.labels``')."""
        names, cfgs = args.get("guider"), args.get("config")
        per = isinstance(names, list)
        names, cfgs = (names, cfgs) if per else ([names], [cfgs])
        classes = _guider_classes()
        out = []
        for n, c in zip(names, cfgs if isinstance(cfgs, list) else [None] * len(names)):
            d = defaults(classes[n]) if n in classes else {}
            shown = [f"{k}={fmt_arg(v)}" for k, v in (c or {}).items() if not (k in d and d[k] == v)]
            out.append(f"{n}({', '.join(shown)})")
        return f"Guider([{', '.join(out)}])" if per else f"Guider({out[0]})"

    def own_scale(self) -> float | None:
        """The scale the guider guides at (one guider, or every per-sample guider agreeing), None
        where it has none single (FDG's per-level scales) or the guiders differ: what a sweep row
        shows as its ``guidance_scale``."""
        vals = {g.config.get("guidance_scale") for g in self.guiders}
        v = vals.pop() if len(vals) == 1 else None
        return float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else None

    def guidance(self, run, step: int):
        guides = self._guides
        return guides[step] if step < len(guides) else None

    def unguided_after(self, run, step: int) -> bool:
        return step >= self._last

    def perturbs_after(self, run, step: int) -> bool:
        return step < self._last_perturbed

    def on_run_end(self, run, error):
        for r in self._rules:
            r.reset()
        rec = getattr(run, "record", None)  # the run's one record: what ran, per step and sample
        if rec is None or not rec.steps:
            return
        b = len(rec.steps[0].guided)
        self.report["guided_steps"] = [[i for i, st in enumerate(rec.steps) if st.guided[j]] for j in range(b)]
        if len(self._steps) and len(self._steps[0][1]) == b:
            self.report["zero_steps"] = [[i for i, (_, z, _) in enumerate(self._steps[:len(rec.steps)]) if z[j]]
                                         for j in range(b)]
        if any(r.perturbing for r in self._rules):
            self.report["perturbed_steps"] = [[i for i, p in enumerate(rec.plans) if p is not None and p.perturb
                                               and p.perturb[j]] for j in range(b)]
        self.report["nfe"] = list(rec.nfe)
