"""The model behind ``python -m dlx demo``: the embedded shapes model when shipped, else a tiny one."""

from __future__ import annotations

from .errors import DlxError


DEMO_PROMPT = "a red circle and a blue square"


def _shapes_available() -> bool:
    from . import zoo

    return (zoo.path("shapes") / "model_index.json").is_file()


def demo_pipeline(model: str = "auto", steps: int = 25, seed: int = 0, prompt=None, guidance_scale=None):
    """(pipeline, call kwargs, label) for the demo; ``model`` is 'auto', 'shapes' or 'tiny'."""
    import torch

    if model not in ("auto", "shapes", "tiny"):
        raise DlxError(f"argument `model` must be 'auto', 'shapes' or 'tiny'; got {model!r}")
    if model == "shapes" or (model == "auto" and _shapes_available()):
        from . import zoo

        info = zoo.info("shapes")
        pipe = zoo.load("shapes", device="cpu", dtype=torch.float32)
        kwargs = dict(
            prompt=prompt or DEMO_PROMPT,
            num_inference_steps=steps,
            guidance_scale=guidance_scale if guidance_scale is not None else info["recommended_guidance_scale"],
            generator=torch.Generator().manual_seed(seed),
        )
        return pipe, kwargs, "embedded shapes model (dlx.zoo)"
    from .testing import example_inputs, tiny_pipeline

    pipe = tiny_pipeline("sd", seed=seed)
    kwargs = example_inputs("sd", steps=steps, seed=seed, prompt=prompt or "a red circle",
                            guidance_scale=guidance_scale if guidance_scale is not None else 5.0)
    return pipe, kwargs, "tiny random-weight SD pipeline (dlx.testing)"
