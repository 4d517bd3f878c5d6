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


def test_release_all_tries_every_engine_and_at_exit_only_drops_graphs():
    # at interpreter exit only graphs are dropped and nothing raises; otherwise every engine is released and the
    # first error comes after
    import pytest

    from cocodiff import engine

    calls = []

    class Engine:
        def __init__(self, name, fail):
            self.name, self.fail = name, fail

        def drop_graphs(self):
            calls.append(("drop", self.name))
            if self.fail:
                raise RuntimeError("device gone")

        def release(self):
            calls.append(("release", self.name))
            if self.fail:
                raise RuntimeError(f"{self.name} failed")

    fakes = [Engine("a", True), Engine("b", True)]
    for f in fakes:
        engine._LIVE.add(f)
    try:
        assert engine.release_all(at_exit=True) >= 2
        assert sorted(c for c in calls if c[1] in "ab") == [("drop", "a"), ("drop", "b")]
        calls.clear()
        with pytest.raises(RuntimeError, match="failed"):
            engine.release_all()
        assert sorted(c for c in calls if c[1] in "ab") == [("release", "a"), ("release", "b")]
    finally:
        for f in fakes:
            engine._LIVE.discard(f)


def test_release_clears_graphed_steps_with_or_without_an_engine(monkeypatch):
    # a GraphedStep registers with its model's engine, and every StepGraphs with the process: `release(model)`
    # and `release()` clear them, also one built before `parallelize` (no engine then)
    import weakref

    import cocodiff
    from cocodiff.graph import GraphedStep, live_graphs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # GraphedStep's check; nothing is captured here

    class FakeEngine:
        vmajor = None

        def __init__(self):
            self.external_graphs = weakref.WeakSet()

    with_engine, without = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with_engine.cocodiff = FakeEngine()
    a, b = GraphedStep(with_engine), GraphedStep(without)
    assert a in with_engine.cocodiff.external_graphs and {a, b} <= set(live_graphs())
    for g in (a, b):
        g._graphs["key"] = object()  # stands in for a captured graph
    assert cocodiff.release(without) == 0 and len(b) == 0 and len(a) == 1  # only the graphs over that model
    b._graphs["key"] = object()
    cocodiff.release()
    assert len(a) == 0 and len(b) == 0
