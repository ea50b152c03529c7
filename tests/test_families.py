"""The family table: every listed pipeline resolves to its family, capabilities are what the
session checks before a call, and the noise levels it computes are the schedulers'."""

import dataclasses
import importlib

import pytest
import torch

import dlx
from dlx.families import FAMILIES, Family, family_of, sigmas_at


@pytest.mark.parametrize("fam", list(FAMILIES.values()), ids=list(FAMILIES))
def test_every_listed_pipeline_resolves_to_its_family(fam):
    diffusers = importlib.import_module("diffusers")
    for name in fam.pipelines:
        cls = getattr(diffusers, name)
        assert family_of(cls) is fam
        sub = type("Mine", (cls,), {})  # user subclasses too
        assert family_of(sub) is fam


def test_the_table_holds_only_fields_something_reads():
    assert [f.name for f in dataclasses.fields(Family)] == [
        "name", "pipelines", "denoiser", "cfg", "conditioning", "latent_format", "prediction", "packed",
        "extra_doubled_modules", "timestep_scale", "scale_schedules", "share", "cfg_switch", "cfg_switch_also",
        "scale_only_combines", "perturbation_guiders"]


def test_capabilities():
    for name, fam in FAMILIES.items():
        assert fam.cfg in ("batch", "calls")
        if fam.cfg == "calls":
            assert not fam.scale_schedules and not fam.share and not fam.cfg_switch
        else:
            assert fam.scale_schedules and fam.share and "prompt_embeds" in fam.cfg_switch


def test_flux_refuses_what_it_cannot_do_at_attach():
    from .helpers import pipe_for

    pipe = pipe_for("flux")
    for part in (dlx.GuidanceSchedule("linear"), dlx.Share(["a"])):
        with pytest.raises(dlx.DlxError, match="not supported on flux"):
            with dlx.attach(pipe, part):
                raise AssertionError("refused before the block runs")


def test_sigmas_are_the_schedulers():
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    e = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    e.set_timesteps(10)
    ours = sigmas_at(FAMILIES["sd"], e, e.timesteps)
    assert torch.allclose(torch.tensor(ours, dtype=torch.float64), e.sigmas[:-1].double(), rtol=1e-5)
    f = FlowMatchEulerDiscreteScheduler(shift=3.0)
    f.set_timesteps(10)
    ours = sigmas_at(FAMILIES["sd3"], f, f.timesteps)
    assert torch.allclose(torch.tensor(ours, dtype=torch.float64), f.sigmas[:-1].double(), rtol=1e-5)
