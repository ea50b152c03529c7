"""Write ``cutoff_b2.safetensors``: a trace in format version 1, as dlx wrote it before steps held
per-sample lists (commit 6b7a96e). Kept to test that ``dlx.Trace.load`` still reads such files.

Regenerate (only with the dlx of that commit, never the current one):

    git archive 6b7a96e dlx | tar -x -C /tmp/dlx_v1
    PYTHONPATH=/tmp/dlx_v1 HF_HUB_OFFLINE=1 python tests/data/trace_v1/make_fixture.py
"""

from pathlib import Path

import dlx
from dlx.testing import example_inputs, tiny_pipeline
from dlx.trace import FORMAT_VERSION

assert FORMAT_VERSION == 1, "run this with the dlx of commit 6b7a96e (see the docstring)"

pipe = tiny_pipeline("sd", seed=0)
# batch 2: sample 0 guided on the first 3 of 4 steps, sample 1 on the first; each sample's scale
# its own linear schedule; the latents only (a small file)
parts = dlx.CFGCutoff(ratio=[0.75, 0.25]), dlx.GuidanceSchedule("linear", low=[2.0, 3.0], high=[4.0, 7.0])
with dlx.record(pipe, *parts, keep=("latents",)) as trace:
    pipe(**example_inputs("sd", steps=4, batch=2, seed=0))
trace.save(Path(__file__).with_name("cutoff_b2.safetensors"))
for s in trace:
    print(s.index, s.guidance_scale, s.cfg_active, s.nfe, s.cfg_mask.tolist(), s.scale.tolist())
print(trace.meta["nfe"])
