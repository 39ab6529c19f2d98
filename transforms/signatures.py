"""DoFn method signatures read once per class, through Beam's ``_inspect_<method>`` hook.

Why: a runner asks a DoFn for the arguments of its methods whenever it builds
the DoFn's signature, and Beam answers with ``inspect.signature`` each time
(`apache_beam.transforms.core.get_function_args_defaults`). The bundle-based
DirectRunner (the local streaming runner) does that for every bundle, and
runs a stateful step one bundle per key; `userstate.get_dofn_specs`, called
several times per bundle, inspects *every* method the DoFn has. A py-spy
profile of the streaming job on the emulators put 47% of the process in
`get_dofn_specs` and 36% in `inspect.signature` (docs/streaming.md, Measured).

`core.get_function_arguments(obj, name)` first looks for a method
``_inspect_<name>`` on the object and returns what it returns (Beam's own
`CallableWrapperDoFn` and the runtime type-check wrapper use this hook). A
DoFn that mixes in `CachedSignatures` answers every such question from a cache
keyed by its class and the method's name, so the signature of a method is read
once per process instead of once per bundle, on every runner, without
touching Beam. What it returns equals `get_function_args_defaults` of the
bound method (checked by tests/test_signatures.py, for ``process`` with state,
timer, key, window and timestamp parameters, timer callbacks and every other
method). A method assigned on the instance (``dofn.process = f``) is not
cached: it is read each time, as Beam would.

`MapFn`, `FlatMapFn` and `FilterFn` are `beam.Map`, `beam.FlatMap` and
`beam.Filter` for functions applied to many small bundles (the streaming
graph, its table writers and dead-letter chain): Beam's own wrapper inspects
the wrapped function and every method for each bundle.
"""
from __future__ import annotations

import threading
import types
from typing import Any, Callable, Dict, Iterable, Iterator, List, Tuple

import apache_beam as beam
from apache_beam.transforms import core

_HOOK = "_inspect_"

Arguments = Tuple[List[str], List[Any]]

# (DoFn class, method name) -> (argument names, default values): one entry per method of each
# class asked about, i.e. bounded by the code, not by the data.
_CACHE: Dict[Tuple[type, str], Arguments] = {}
_LOCK = threading.Lock()


def arguments_of(obj: Any, method: str) -> Arguments:
    """``core.get_function_args_defaults(getattr(obj, method))``, read once per class.

    Args:
        obj: the DoFn (or any object whose methods Beam inspects).
        method: the method's name.

    Returns:
        New lists of the argument names and default values (the defaults are the
        function's own objects, e.g. its `DoFn.StateParam`), so a caller may not
        alter the cached entry.
    """
    if method in getattr(obj, "__dict__", ()):
        # Assigned on the instance: not the class's method, so not the class's signature.
        return core.get_function_args_defaults(getattr(obj, method))
    key = (type(obj), method)
    found = _CACHE.get(key)
    if found is None:
        found = core.get_function_args_defaults(getattr(obj, method))
        with _LOCK:
            _CACHE.setdefault(key, found)
    return list(found[0]), list(found[1])


class _Inspect:
    """The ``_inspect_<method>`` callable Beam finds: ``()`` → `arguments_of(obj, method)`.

    A small class rather than a closure so that nothing unpicklable is ever
    attached to a DoFn (it is built on each lookup and never stored).
    """

    __slots__ = ("_obj", "_method")

    def __init__(self, obj: Any, method: str):
        self._obj = obj
        self._method = method

    def __call__(self) -> Arguments:
        return arguments_of(self._obj, self._method)


# A DoFn parameter marker (StateParam, TimerParam, TimestampParam, KeyParam, ...): its class,
# read off a public marker rather than imported by its private name.
_DOFN_PARAM = type(beam.DoFn.TimestampParam)
_LIFECYCLE = frozenset(("process", "process_batch", "start_bundle", "finish_bundle", "setup",
                        "teardown"))
# DoFn class -> names of its methods that take no DoFn parameter (see CachedSignatures.__dir__).
_PLAIN_METHODS: Dict[type, frozenset] = {}


def _plain_methods(obj: Any) -> frozenset:
    """The class's methods, other than the lifecycle ones, with no DoFn parameter default."""
    cls = type(obj)
    found = _PLAIN_METHODS.get(cls)
    if found is None:
        plain = set()
        for name in object.__dir__(obj):
            if name in _LIFECYCLE or not callable(getattr(cls, name, None)):
                continue
            method = getattr(obj, name, None)
            if not isinstance(method, types.MethodType):
                continue
            _, defaults = arguments_of(obj, name)
            if not any(isinstance(d, _DOFN_PARAM) for d in defaults):
                plain.add(name)
        found = _PLAIN_METHODS.setdefault(cls, frozenset(plain))
    return found


class CachedSignatures:
    """Mixin for a DoFn: Beam's signature questions answered once per class and method.

    Put it first among the bases (``class F(CachedSignatures, beam.DoFn)``). It
    adds no attribute and no state: only attribute names starting with
    ``_inspect_`` that the class does not define are answered (Python calls
    ``__getattr__`` only for names normal lookup misses), so pickling,
    copying and the DoFn's own methods are unaffected. A method the class
    defines as ``_inspect_<name>`` itself wins over the cache.

    ``dir()`` of such a DoFn leaves out the methods that take no DoFn
    parameter (``default_type_hints``, ``display_data``, ``to_runner_api``,
    ... about 40 of them), except the lifecycle methods. Beam's only use of
    ``dir()`` on a DoFn is `userstate.get_dofn_specs`, which wraps every method
    it lists to collect state and timer specs and runs several times per
    bundle on the DirectRunner; a method without a DoFn parameter adds
    nothing to what it returns, so the specs, and every check Beam makes on
    them, are the same (tested), for a fraction of the work.
    """

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        if name.startswith(_HOOK) and len(name) > len(_HOOK):
            return _Inspect(self, name[len(_HOOK):])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __dir__(self) -> Iterable[str]:
        plain = _plain_methods(self)
        own = getattr(self, "__dict__", {})
        return [name for name in object.__dir__(self) if name not in plain or name in own]


class MapFn(CachedSignatures, beam.DoFn):
    """``beam.Map(fn, *args)`` as ``beam.ParDo(MapFn(fn), *args)``: one output per input.

    Beam's `CallableWrapperDoFn` reads the signature of ``fn`` and of each of
    its own methods for every bundle; this DoFn's are read once per process.
    Its type hints and inferred output type are those Beam's own ``Map`` gives
    the same function (read from the DoFn `_twin` builds, at construction
    only), so the output PCollection's element type, and the coder chosen from
    it, are the same as with ``beam.Map`` (tested); ``.with_output_types``
    still overrides them.
    """

    # The Beam transform this DoFn stands for: its DoFn is the reference for the type hints.
    _BEAM = staticmethod(beam.Map)

    def __init__(self, fn: Callable[..., Any]):
        super().__init__()
        self._fn = fn

    def _twin(self) -> beam.DoFn:
        """The DoFn Beam builds for the same function (never run, never stored)."""
        return self._BEAM(self._fn).fn

    def default_type_hints(self):
        return self._twin().default_type_hints()

    def infer_output_type(self, input_type):
        return self._twin().infer_output_type(input_type)

    def default_label(self) -> str:
        return f"{type(self).__name__}({getattr(self._fn, '__name__', type(self._fn).__name__)})"

    def process(self, element: Any, *args, **kwargs) -> Iterator[Any]:
        yield self._fn(element, *args, **kwargs)


class FlatMapFn(MapFn):
    """``beam.FlatMap(fn, *args)`` as ``beam.ParDo(FlatMapFn(fn), *args)``: each output of ``fn``."""

    _BEAM = staticmethod(beam.FlatMap)

    def process(self, element: Any, *args, **kwargs) -> Iterable[Any]:
        return self._fn(element, *args, **kwargs) or ()


class FilterFn(MapFn):
    """``beam.Filter(fn, *args)`` as ``beam.ParDo(FilterFn(fn), *args)``: inputs ``fn`` keeps."""

    _BEAM = staticmethod(beam.Filter)

    def process(self, element: Any, *args, **kwargs) -> Iterator[Any]:
        if self._fn(element, *args, **kwargs):
            yield element


class WindowInto(beam.WindowInto):
    """`beam.WindowInto` whose DoFn reads its signature once per process (`CachedSignatures`).

    Why: the local bundle-based DirectRunner runs a WindowInto as a ParDo of
    its DoFn, one bundle per upstream bundle (most of them empty), and Beam's
    `WindowIntoFn` has its signature re-read for each one; in a field-rate run
    it was the most inspected DoFn of the job (docs/streaming-directrunner.md).
    Beam's ``__init__`` builds the DoFn as ``self.WindowIntoFn(...)``, so
    overriding the nested class is enough. The transform is otherwise Beam's:
    the same URN and windowing-strategy payload in the runner API (Dataflow
    translates a WindowInto by URN and never runs this DoFn), the same default
    label (tested). A pipeline rebuilt from its runner-API form gets Beam's own
    WindowInto back, which is why the job skips that round trip on the local
    runner (`pipelines.streaming_refresh.launch`). Shared by batch transforms
    the streaming job also runs (`transforms.bandit`).
    """

    class WindowIntoFn(CachedSignatures, beam.WindowInto.WindowIntoFn):
        """Beam's WindowIntoFn with cached signatures."""


# Picklable by reference under a module-level name too (as Beam does for its own).
WindowIntoFn = WindowInto.WindowIntoFn
