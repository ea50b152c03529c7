"""Wall time spent inside dlx during pipeline calls, measured from inside (for host-bound runs).

When the host bounds a run (eager CUDA: the UNet's kernel launches take longer than the GPU
needs to run them), every microsecond dlx spends on the host lengthens the run by as much, and
this clock measures it directly instead of inferring it from the difference of two noisy wall
times. It sums, per call:

* per step: the denoiser tap less the denoiser itself, the chained step-end callback, and a
  ``dlx.Preview`` used as a plain ``callback_on_step_end``;
* per call: ``attach``'s set-up and tear-down around the pipeline call (the end-of-run work of
  the parts included).
"""

from __future__ import annotations

import time


class HookClock:
    def __init__(self, clock=time.perf_counter):
        from dlx import preview, session
        from dlx._tap import Tap

        self.total = 0.0
        self._depth = 0
        hc = self
        self._saved = [(Tap, "_wrap_batch", Tap._wrap_batch), (session._Chain, "__call__", session._Chain.__call__),
                       (preview.Preview, "__call__", preview.Preview.__call__),
                       (session._Session, "call", session._Session.call)]

        def timed(fn):
            def f(*a, **k):
                if hc._depth:  # nested inside another timed hook: counted there
                    return fn(*a, **k)
                hc._depth += 1
                t0 = clock()
                try:
                    return fn(*a, **k)
                finally:
                    hc.total += clock() - t0
                    hc._depth -= 1
            return f

        def untimed(fn):  # time inside fn is not dlx's
            def f(*a, **k):
                t0 = clock()
                try:
                    return fn(*a, **k)
                finally:
                    hc.total -= clock() - t0
            return f

        wrap = Tap._wrap_batch

        def _wrap_batch(tap, orig, denoiser):
            return timed(wrap(tap, untimed(orig), denoiser))

        Tap._wrap_batch = _wrap_batch
        session._Chain.__call__ = timed(session._Chain.__call__)
        preview.Preview.__call__ = timed(preview.Preview.__call__)
        call = session._Session.call

        def session_call(self_, orig_call, pipe, args, kwargs):
            hc._depth += 1  # the set-up and tear-down count; the pipeline call does not,
            t0 = clock()    # except the hooks inside it, counted when they run
            inner = untimed(lambda *a, **k: _hooks_on(orig_call, *a, **k))
            try:
                return call(self_, inner, pipe, args, kwargs)
            finally:
                hc.total += clock() - t0
                hc._depth -= 1

        def _hooks_on(orig_call, *a, **k):
            depth, hc._depth = hc._depth, 0
            try:
                return orig_call(*a, **k)
            finally:
                hc._depth = depth

        session._Session.call = session_call

    def close(self) -> None:
        """Put dlx back as it was."""
        for cls, name, f in self._saved:
            setattr(cls, name, f)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def take(self) -> float:
        """Seconds inside dlx since the last ``take``."""
        t, self.total = self.total, 0.0
        return t
