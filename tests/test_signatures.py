"""DoFn signatures read once per class (`transforms.signatures`), equal to Beam's own reading.

The bundle-based DirectRunner rebuilds every DoFn's signature for each
bundle; `CachedSignatures` answers Beam's ``_inspect_<method>`` hook from a
per-class cache. These tests check that the answer is exactly Beam's, for
every method Beam inspects (process with state, timer, key, window and
timestamp parameters, timer callbacks, lifecycle methods), that a subclass
gets its own entry, that a pickled copy (what the DirectRunner runs) still
works, and that the cache is what answers (a plain DoFn is inspected again).
"""
import importlib
import inspect
import os
import pickle
import pkgutil
import types
from typing import Iterable

import apache_beam as beam
import pytest
from apache_beam.coders import PickleCoder
from apache_beam.internal import pickler
from apache_beam.runners.common import DoFnSignature
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import core, userstate
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms import trigger, window
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Duration

import transforms.streaming
from transforms import bigquery_io, signatures
from transforms.signatures import (CachedSignatures, FilterFn, FlatMapFn, MapFn, WindowInto,
                                  WindowIntoFn)


class _Counting(beam.DoFn):
    """A stateful DoFn as the job writes them: state, an event-time timer, a callback."""

    TOTAL = ReadModifyWriteStateSpec("total", PickleCoder())
    FLUSH = TimerSpec("flush", TimeDomain.WATERMARK)

    def process(self, element, timestamp=beam.DoFn.TimestampParam,
                win=beam.DoFn.WindowParam, total=beam.DoFn.StateParam(TOTAL),
                flush=beam.DoFn.TimerParam(FLUSH)):
        total.write((total.read() or 0) + element[1])
        flush.set(win.max_timestamp())

    @on_timer(FLUSH)
    def release(self, key=beam.DoFn.KeyParam, fired=beam.DoFn.TimestampParam,
                total=beam.DoFn.StateParam(TOTAL)):
        yield key, total.read()
        total.clear()


class CachedCounting(CachedSignatures, _Counting):
    pass


class CachedCountingTwice(CachedCounting):
    """Its process has another signature: it must not get its parent's entry."""

    def process(self, element, total=beam.DoFn.StateParam(_Counting.TOTAL),
                flush=beam.DoFn.TimerParam(_Counting.FLUSH)):
        total.write((total.read() or 0) + 2 * element[1])
        flush.set(beam.window.GlobalWindow().max_timestamp())


def _methods(dofn):
    """Every method, including those ``dir()`` of a CachedSignatures DoFn leaves out."""
    return [name for name in object.__dir__(dofn)
            if isinstance(getattr(dofn, name, None), types.MethodType)]


def _same(found, expected):
    """Equal names, and the very same default objects (StateParam, TimerParam, ...)."""
    assert found[0] == expected[0]
    assert len(found[1]) == len(expected[1])
    assert all(a is b or a == b for a, b in zip(found[1], expected[1]))


@pytest.mark.parametrize("dofn", [CachedCounting(), CachedCountingTwice(),
                                  pickler.roundtrip(CachedCounting())])
def test_every_method_answers_what_beam_reads_itself(dofn):
    names = _methods(dofn)
    assert {"process", "release", "setup", "start_bundle", "finish_bundle",
            "teardown", "process_batch", "default_type_hints"} <= set(names)
    for name in names:
        for _ in range(2):  # the first answer fills the cache, the second reads it
            _same(core.get_function_arguments(dofn, name),
                  core.get_function_args_defaults(getattr(dofn, name)))
    plain, cached = userstate.get_dofn_specs(_Counting()), userstate.get_dofn_specs(dofn)
    assert cached == plain and len(cached[0]) == 1 and len(cached[1]) == 1


def test_beam_builds_the_same_signature_state_and_timer_parameters():
    for dofn in (CachedCounting(), pickler.roundtrip(CachedCounting())):
        signature, reference = DoFnSignature(dofn), DoFnSignature(_Counting())
        assert signature.is_stateful_dofn()
        process, expected = signature.process_method, reference.process_method
        assert process.args == expected.args == ["element", "timestamp", "win", "total", "flush"]
        _same((process.args, process.defaults), (expected.args, expected.defaults))
        (timer, method), = signature.timer_methods.items()
        (_, expected_method), = reference.timer_methods.items()
        assert timer == _Counting.FLUSH and method.method_value.__name__ == "release"
        assert method.args == ["key", "fired", "total"]
        _same((method.args, method.defaults), (expected_method.args, expected_method.defaults))
        userstate.validate_stateful_dofn(dofn)


def test_a_subclass_with_another_process_gets_its_own_entry():
    parent = core.get_function_arguments(CachedCounting(), "process")
    child = core.get_function_arguments(CachedCountingTwice(), "process")
    assert parent[0] == ["element", "timestamp", "win", "total", "flush"]
    assert child[0] == ["element", "total", "flush"]
    assert core.get_function_arguments(CachedCounting(), "process") == parent


def test_the_cache_answers_instead_of_inspect(monkeypatch):
    """Once a class is read, Beam's questions about it never reach inspect again.

    (Beam also inspects the runner's own watermark-estimator provider once per
    signature; it is not a DoFn and not counted here.)
    """
    DoFnSignature(CachedCounting())     # read once
    calls = []
    real = core.get_function_args_defaults
    monkeypatch.setattr(signatures.core, "get_function_args_defaults", lambda f: (
        calls.append(f) if isinstance(getattr(f, "__self__", None), beam.DoFn) else None)
        or real(f))
    for _ in range(3):
        DoFnSignature(pickler.roundtrip(CachedCounting()))
        userstate.get_dofn_specs(pickler.roundtrip(CachedCounting()))
    assert calls == []
    DoFnSignature(_Counting())          # the control: a plain DoFn is inspected every time
    assert len(calls) > 10


def test_a_method_assigned_on_the_instance_is_read_as_it_is():
    dofn = CachedCounting()
    core.get_function_arguments(dofn, "process")                    # the class's, cached
    dofn.process = lambda element, extra=None: [element]
    assert core.get_function_arguments(dofn, "process") == (["element", "extra"], [None])
    assert core.get_function_arguments(CachedCounting(), "process")[0][0:3] == [
        "element", "timestamp", "win"]


def test_the_mixin_adds_no_attribute_and_pickles():
    dofn = CachedCounting()
    assert not hasattr(dofn, "__setstate__") or "__setstate__" in dir(type(dofn))
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        dofn.missing  # noqa: B018
    assert not hasattr(dofn, "_inspect_")
    copy = pickle.loads(pickle.dumps(dofn))
    assert isinstance(copy, CachedCounting) and vars(copy) == vars(dofn)


def test_dir_leaves_out_only_methods_without_dofn_parameters():
    """What Beam's get_dofn_specs walks: the lifecycle methods and every method taking a param."""
    dofn = CachedCounting()
    listed = set(dir(dofn))
    assert {"process", "release", "setup", "teardown", "start_bundle", "finish_bundle",
            "process_batch", "TOTAL", "FLUSH"} <= listed
    assert not {"display_data", "default_type_hints", "to_runner_api"} & listed
    assert hasattr(dofn, "display_data") and "display_data" in object.__dir__(dofn)
    for name in set(_methods(dofn)) - listed:      # nothing left out takes a DoFn parameter
        _, defaults = core.get_function_args_defaults(getattr(dofn, name))
        assert not any(isinstance(d, type(beam.DoFn.TimestampParam)) for d in defaults), name
    dofn.display_data = lambda: {}                 # assigned on the instance: listed again
    assert "display_data" in dir(dofn)


def test_a_stateful_dofn_with_the_mixin_runs_on_the_direct_runner():
    with TestPipeline("DirectRunner") as p:
        out = (p | beam.Create([("a", 1), ("a", 2), ("b", 5)])
               | beam.ParDo(CachedCounting()))
        assert_that(out, equal_to([("a", 3), ("b", 5)]))


def test_map_and_flat_map_fns_apply_the_function_with_its_arguments():
    with TestPipeline("DirectRunner") as p:
        words = p | beam.Create(["a", "bb"])
        mapped = words | "Map" >> beam.ParDo(MapFn(lambda w, n, suffix="": w * n + suffix),
                                             2, suffix="!")
        flat = words | "FlatMap" >> beam.ParDo(FlatMapFn(lambda w, n: [w] * n), 2)
        assert_that(mapped, equal_to(["aa!", "bbbb!"]), label="Mapped")
        assert_that(flat, equal_to(["a", "a", "bb", "bb"]), label="Flat")
    assert MapFn(len).default_label() == "MapFn(len)"


def test_every_streaming_dofn_reads_its_signature_once():
    """A DoFn added to the stream without the mixin would go back to per-bundle inspection."""
    modules = [importlib.import_module(f"transforms.streaming.{m.name}")
               for m in pkgutil.iter_modules(transforms.streaming.__path__)]
    dofns = {cls for module in modules + [bigquery_io] for _, cls in inspect.getmembers(
        module, inspect.isclass) if issubclass(cls, beam.DoFn)
        and cls.__module__ == module.__name__}
    dofns.discard(bigquery_io.ValidateRowsFn)   # batch only
    dofns.discard(bigquery_io.QueryPagesFn)
    assert bigquery_io.InsertRows in dofns and len(dofns) > 15
    missing = sorted(cls.__name__ for cls in dofns if not issubclass(cls, CachedSignatures))
    assert missing == []


def test_insert_rows_makes_no_client_for_an_empty_bundle(monkeypatch):
    """The DirectRunner sets the writer up per bundle; most of a stream's bundles are empty."""
    import transforms.bigquery
    monkeypatch.setattr(transforms.bigquery, "client",
                        lambda *a, **k: pytest.fail("client made for an empty bundle"))
    fn = bigquery_io.InsertRows("test-project.ds.tbl", {"schema": {"fields": []}}, 10, 1.0)
    fn.setup()
    fn.start_bundle()
    assert list(fn.finish_bundle()) == []


# ---- Map, FlatMap, Filter and WindowInto of the streaming graph ----------------------------

def _shout(word: str) -> int:
    return len(word)


def _letters(word: str) -> Iterable[str]:
    return list(word)


@pytest.mark.parametrize("beam_kind, ours, fn", [
    (beam.Map, MapFn, _shout),                              # annotated
    (beam.Map, MapFn, lambda _: 1),                         # inferred from the bytecode: int
    (beam.Map, MapFn, lambda kv: (0, kv)),                  # Tuple[int, str]: a GroupByKey key
    (beam.FlatMap, FlatMapFn, _letters),
    (beam.Filter, FilterFn, lambda w: len(w) > 1),          # keeps the input's type
])
def test_map_flat_map_and_filter_fns_give_the_element_type_beam_gives(beam_kind, ours, fn):
    """Coders follow element types: replacing beam.Map must not change them."""
    p = beam.Pipeline()
    words = p | beam.Create(["a", "bb"]).with_output_types(str)
    theirs = words | "Beam" >> beam_kind(fn)
    mine = words | "Ours" >> beam.ParDo(ours(fn))
    assert mine.element_type == theirs.element_type
    assert str(mine.element_type) != "Any"


def test_map_fn_checks_its_input_type_as_beam_map_does():
    p = beam.Pipeline()
    numbers = p | beam.Create([1, 2]).with_output_types(int)
    with pytest.raises(Exception, match="[Tt]ype"):
        numbers | "Beam" >> beam.Map(_shout)
    with pytest.raises(Exception, match="[Tt]ype"):
        numbers | "Ours" >> beam.ParDo(MapFn(_shout))


def test_filter_fn_keeps_what_the_function_accepts():
    with TestPipeline("DirectRunner") as p:
        words = p | beam.Create(["a", "bb", "ccc"])
        kept = words | beam.ParDo(FilterFn(lambda w, n: len(w) >= n), 2)
        assert_that(kept, equal_to(["bb", "ccc"]))
    assert FilterFn(len).default_label() == "FilterFn(len)"


WINDOWINGS = [
    lambda kind: kind(window.GlobalWindows()),
    lambda kind: kind(window.FixedWindows(60)),
    lambda kind: kind(window.SlidingWindows(3600, 60),
                      trigger=trigger.AfterWatermark(late=trigger.AfterCount(1)),
                      accumulation_mode=trigger.AccumulationMode.ACCUMULATING,
                      allowed_lateness=Duration(seconds=600)),
    lambda kind: kind(window.GlobalWindows(), trigger=trigger.Repeatedly(trigger.AfterCount(1)),
                      accumulation_mode=trigger.AccumulationMode.DISCARDING,
                      timestamp_combiner=window.TimestampCombiner.OUTPUT_AT_EARLIEST),
]


def _window_into_proto(make):
    """The WindowInto step's URN and payload, and its output's windowing strategy."""
    p = beam.Pipeline()
    (p | beam.Create([("k", 1)]) | "Win" >> make())
    proto = p.to_runner_api()
    comps = proto.components
    (step,) = [t for t in comps.transforms.values() if t.unique_name == "Win"]
    strategy = comps.windowing_strategies[
        comps.pcollections[list(step.outputs.values())[0]].windowing_strategy_id]
    return step.spec.urn, step.spec.payload, strategy.SerializeToString(deterministic=True)


@pytest.mark.parametrize("windowing", WINDOWINGS)
def test_window_into_translates_to_the_runner_api_exactly_as_beams(windowing):
    """Dataflow translates WindowInto by URN and payload and never runs its DoFn."""
    theirs = _window_into_proto(lambda: windowing(beam.WindowInto))
    mine = _window_into_proto(lambda: windowing(WindowInto))
    assert mine == theirs
    assert theirs[0] == "beam:transform:window_into:v1"
    ours = windowing(WindowInto)
    assert isinstance(ours.fn, CachedSignatures)
    assert ours.default_label() == windowing(beam.WindowInto).default_label()


def _windowed_run(monkeypatch, test_runner_api):
    """Fixed windows summed per key on the bundle-based DirectRunner: the WindowInto DoFns run."""
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.direct import transform_evaluator
    ran = set()
    evaluator = transform_evaluator._ParDoEvaluator
    original = evaluator.start_bundle

    def seen(self):   # the DoFn of every ParDo bundle the runner starts
        ran.add(type(self._applied_ptransform.transform.dofn))
        return original(self)

    monkeypatch.setattr(evaluator, "start_bundle", seen)
    p = beam.Pipeline("BundleBasedDirectRunner", options=PipelineOptions([]))
    out = (p | beam.Create([("a", 1), ("a", 2), ("b", 5)])
           | beam.ParDo(MapFn(lambda kv: window.TimestampedValue(kv, 1)))
           | WindowInto(window.FixedWindows(60))
           | beam.CombinePerKey(sum))
    assert_that(out, equal_to([("a", 3), ("b", 5)]))
    p.run(test_runner_api=test_runner_api).wait_until_finish()
    return {cls for cls in ran if issubclass(cls, beam.WindowInto.WindowIntoFn)}


def test_the_local_runner_runs_the_cached_window_into_fn(monkeypatch):
    """Beam's runner-API round trip would rebuild Beam's own WindowInto; the job skips it there."""
    from pipelines.streaming_refresh import runner_api_round_trip
    assert runner_api_round_trip("BundleBasedDirectRunner") is False
    assert runner_api_round_trip("DataflowRunner") == "AUTO"
    assert runner_api_round_trip(None) == "AUTO"
    # (assert_that has a WindowInto of its own: Beam's.)
    assert WindowIntoFn in _windowed_run(monkeypatch,
                                         runner_api_round_trip("BundleBasedDirectRunner"))
    # With the round trip the runner gets Beam's own DoFn back (why the job skips it locally).
    assert _windowed_run(monkeypatch, True) == {beam.WindowInto.WindowIntoFn}


def _inside_beam(node) -> bool:
    """A step of one of Beam's own composites (a combine, GroupByKey, Create, Pub/Sub I/O)."""
    parent = node.parent
    if parent is not None and isinstance(parent.transform, core._MultiParDo):
        parent = parent.parent   # ParDo(...).with_outputs(...): Beam's wrapper, the job's step
    return (parent is not None and parent.transform is not None
            and type(parent.transform).__module__.startswith("apache_beam."))


def test_no_beam_map_filter_or_window_into_is_left_in_the_streaming_graph(monkeypatch):
    """Every ParDo of the job's own steps answers signature questions from the cache."""
    sys_path_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.syspath_prepend(os.path.join(sys_path_root, "tests"))
    import test_streaming_step_labels as labels
    built = []
    original = labels.job.build
    monkeypatch.setattr(labels.job, "build",
                        lambda pipeline, *a, **k: (built.append(pipeline),
                                                   original(pipeline, *a, **k)))
    for name, extra in labels.VARIANTS.items():
        labels.graph_labels(extra, labels.VARIANT_CONFIGS.get(name, labels.DEFAULT_CONFIG),
                            name in labels.VARIANT_RANKED)
    uncached = set()

    class Visit(beam.pipeline.PipelineVisitor):
        def visit_transform(self, node):
            fn = getattr(node.transform, "fn", None)
            if (isinstance(node.transform, beam.ParDo) and not isinstance(fn, CachedSignatures)
                    and not _inside_beam(node)):
                uncached.add((node.full_label, type(fn).__name__))

    for pipeline in built:
        pipeline.visit(Visit())
    assert len(built) == len(labels.VARIANTS)
    assert sorted(uncached) == []
