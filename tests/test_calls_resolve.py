"""Worker-side resolution of call targets and the object table (kameo._calls), in-process:
these are the pieces a CALL frame goes through before anything runs."""

from __future__ import annotations

import collections
import json

import pytest
from kameo import _calls


def test_colon_form_with_a_dotted_qualname() -> None:
    assert _calls.load("collections:OrderedDict.fromkeys") == collections.OrderedDict.fromkeys


def test_dotted_form_takes_the_longest_importable_module() -> None:
    assert _calls.split_target("math.hypot") == ("math", "hypot")
    assert _calls.split_target("os.path.join") == ("os.path", "join")
    assert _calls.split_target("collections.OrderedDict.fromkeys") == (
        "collections",
        "OrderedDict.fromkeys",
    )
    assert _calls.load("json.dumps") is json.dumps


def test_bad_targets_raise_the_builtin_type_naming_the_target() -> None:
    with pytest.raises(ModuleNotFoundError, match="nosuchmodule_x"):
        _calls.load("nosuchmodule_x:f")
    with pytest.raises(ModuleNotFoundError, match="nosuchmodule_x"):
        _calls.load("nosuchmodule_x.f")
    with pytest.raises(AttributeError, match=r"'math:nope'.*no attribute 'nope'"):
        _calls.load("math:nope")
    calls = _calls.Calls(1)
    with pytest.raises(TypeError, match="not callable"):
        calls.function("math:pi")
    with pytest.raises(ValueError, match="module:qualname"):
        calls.function(":f")
    with pytest.raises(ValueError, match="adapter"):
        calls.function("predict")


def test_an_import_error_inside_an_existing_module_is_not_swallowed(tmp_path, monkeypatch) -> None:
    (tmp_path / "kameo_broken_mod.py").write_text("import nosuch_dependency_y\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="nosuch_dependency_y"):
        _calls.split_target("kameo_broken_mod.f")


def test_prepare_call_and_method_ops() -> None:
    calls = _calls.Calls(3)
    job = calls.prepare(("call", None, "math:hypot", (3, 4), {}, 0))
    assert job.fn(*job.args, **job.kwargs) == 5.0 and job.kind == "sync" and not job.return_ref
    counter = collections.Counter("abracadabra")
    job = calls.prepare(("method", "s1", counter, "most_common", (1,), {}, _calls.RETURN_REF))
    assert job.fn(*job.args) == [("a", 5)] and job.return_ref and job.session == "s1"
    with pytest.raises(AttributeError, match="private"):
        calls.prepare(("method", None, counter, "__class__", (), {}, 0))
    with pytest.raises(ValueError, match="unknown call op"):
        calls.prepare(("nope", None))


def test_adapter_methods_by_bare_name() -> None:
    class Model:
        def predict(self, x: int) -> int:
            return x * 2

    calls = _calls.Calls(1, adapter=Model())
    job = calls.prepare(("call", None, "predict", (21,), {}, 0))
    assert job.fn(*job.args) == 42
    with pytest.raises(AttributeError, match="no method 'train'"):
        calls.function("train")


def test_objects_numbering_release_and_sessions() -> None:
    objects = _calls.Objects(7)
    n1, t1 = objects.keep(collections.Counter("ab"), None)
    n2, t2 = objects.keep(object(), "s")
    assert (t1, t2) == ("collections.Counter", "object") and n1 != n2 and len(objects) == 2
    assert objects.resolve(7, n1, t1) == collections.Counter("ab")
    with pytest.raises(LookupError, match="worker 3"):
        objects.resolve(3, n1, t1)
    objects.session("s").state["k"] = 1
    assert objects.close_session("s") == 1 and len(objects) == 1 and "s" not in objects.sessions
    objects.release([n1, 999])
    assert len(objects) == 0
    with pytest.raises(LookupError, match="released"):
        objects.resolve(7, n1, t1)
