"""The cuda_graph switch's bookkeeping that needs no GPU (the distributed part runs in test_models)."""

import torch


def test_graph_switch_warns_when_a_changing_argument_defeats_reuse():
    import warnings

    from cocodiff.graph import StepGraphs

    class Recorder(StepGraphs):  # eager stand-in for CUDA graphs
        def _warm_up(self, static_args, static_kwargs):
            pass

        def _record(self, static_args, static_kwargs):
            out = self.fn(*static_args, **static_kwargs)

            class Replay:
                def replay(self_inner):
                    out.copy_(self.fn(*static_args, **static_kwargs))

            return Replay(), out

    graphs = Recorder(lambda x, t: x * t)
    x = torch.ones(3)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(StepGraphs.MANY):
            assert torch.equal(graphs(x, t=float(step)), x * step)
        assert torch.equal(graphs(x + 1, t=2.0), (x + 1) * 2)  # a replay reads the new tensor input
    assert len(graphs) == StepGraphs.MANY
    msgs = [str(w.message) for w in caught if "defeats graph reuse" in str(w.message)]
    assert len(msgs) == 1 and "['t']" in msgs[0], msgs
    # graphs that differ only in the extra key (V-Major's cache level) are by design: two input signatures with
    # five levels each are ten graphs and no warning
    level = [0]
    graphs = Recorder(lambda x: x * 2, key=lambda: level[0])
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n in (3, 4):
            for level[0] in range(5):
                assert torch.equal(graphs(torch.ones(n)), torch.full((n,), 2.0))
    assert len(graphs) == 10 and not [w for w in caught if "defeats graph reuse" in str(w.message)]


def test_release_at_exit_never_raises():
    # the atexit fallback runs while the interpreter finishes: an engine whose graphs cannot be dropped any more
    # (its process group or device gone) must not turn a clean exit into a traceback
    from cocodiff import engine

    class Gone:
        def drop_graphs(self):
            raise RuntimeError("device gone")

    gone = Gone()
    engine._LIVE.add(gone)
    try:
        assert engine.release_all(at_exit=True) >= 1
    finally:
        engine._LIVE.discard(gone)
