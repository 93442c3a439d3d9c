"""The state directory (poetc.runtime.statedir) and the StateRead / StateWrite ops (state_ops.c) on a
hand-built graph: values across steps, re-reads, frozen parameters, the commit protocol, and refusals of
torn, truncated, altered, foreign and stale-generation files (a failed step names the file)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper

from poetc.errors import RuntimeFailure
from poetc.runtime import contract, statedir
from poetc.runtime.session import contract_session_options
from poetc.runtime.statedir import StateDir, StateError


@pytest.fixture
def lib(spill_lib) -> Path:
    """The host op library (conftest's spill_lib)."""
    return spill_lib


def _graph(lib) -> ort.InferenceSession:
    """w (paged) += x + f (f frozen, paged); returns the write token, the re-read of w after the write and
    the value of f."""
    rt, ra = contract.make_state_read_node_spec(T.FLOAT, "w")
    ft, fa = contract.make_state_read_node_spec(T.FLOAT, "f")
    wt, wa = contract.make_state_write_node_spec(T.FLOAT, "w")
    nodes = [helper.make_node(rt, [], ["w"], domain="poet", **ra),
             helper.make_node(ft, ["w"], ["f"], domain="poet", **fa),
             helper.make_node("Add", ["w", "x"], ["wx"]),
             helper.make_node("Add", ["wx", "f"], ["w2"]),
             helper.make_node(wt, ["w2"], ["tok"], domain="poet", **wa),
             helper.make_node(rt, ["tok"], ["w_again"], domain="poet", **ra)]
    vi = lambda n, s, t=T.FLOAT: helper.make_tensor_value_info(n, t, s)  # noqa: E731
    g = helper.make_graph(nodes, "g", [vi("x", [2, 3])], [vi("tok", [1], T.INT64), vi("w_again", [2, 3]), vi("f", [3])],
                          value_info=[vi("w", [2, 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("poet", 1)])
    return ort.InferenceSession(m.SerializeToString(), contract_session_options(lib), providers=["CPUExecutionProvider"])


def _init(lib, d: Path, w=None) -> Path:
    w = np.zeros((2, 3), np.float32) if w is None else w
    return statedir.write_initial_state(d, {"w": w, "f": np.full(3, 0.5, np.float32),
                                            "r": np.arange(4, dtype=np.float32)},
                                        {"note": "test"}, frozen={"f"}, paged={"w", "f"}, library=lib)


def _step(s: StateDir, sess, x=1.0):
    g = s.begin_step()
    tok, again, f = sess.run(None, {"x": np.full((2, 3), x, np.float32)})
    s.write("r", s.read("r") + 1, g)
    return g, tok, again, f


def test_state_ops_three_steps(lib, tmp_path):
    d = _init(lib, tmp_path / "s")
    sess = _graph(lib)
    with StateDir.open(d, library=lib) as s:
        assert s.generation == 0 and s.meta == {"note": "test"}
        for i in range(3):
            g, tok, again, f = _step(s, sess)
            assert tok.tolist() == [i + 1]
            # a re-read after this step's write still sees the committed value (generation g)
            np.testing.assert_array_equal(again, np.full((2, 3), 1.5 * i, np.float32))
            np.testing.assert_array_equal(f, np.full(3, 0.5, np.float32))
            s.commit(g)
        assert s.generations_on_disk() == [3]
    s = StateDir.open(d, library=lib)
    np.testing.assert_array_equal(s.read("w"), np.full((2, 3), 4.5, np.float32))
    np.testing.assert_array_equal(s.read("r"), np.arange(4, dtype=np.float32) + 3)
    s.close()


def test_uncommitted_step_is_discarded(lib, tmp_path):
    d = _init(lib, tmp_path / "s")
    sess = _graph(lib)
    s = StateDir.open(d, library=lib)
    g, *_ = _step(s, sess)
    s.commit(g)
    _step(s, sess)  # runs, writes gen 2, never commits: a crash before the rename
    s.close()
    s = StateDir.open(d, library=lib)
    assert s.generation == 1 and s.generations_on_disk() == [1]
    np.testing.assert_array_equal(s.read("w"), np.full((2, 3), 1.5, np.float32))
    s.close()


def test_commit_refuses_a_missing_tensor(lib, tmp_path):
    s = StateDir.open(_init(lib, tmp_path / "s"), library=lib)
    g = s.begin_step()
    s.write("r", s.read("r"), g)  # w (paged) never written
    with pytest.raises(StateError, match=r"did not write every state tensor: \['w'\]"):
        s.commit(g)
    assert statedir.committed_step(s.path) == 0
    s.close()


def test_lock_refuses_a_second_trainer(lib, tmp_path):
    d = _init(lib, tmp_path / "s")
    s = StateDir.open(d, library=lib)
    with pytest.raises(StateError, match="in use by another poetc process"):
        StateDir.open(d, library=lib)
    s.close()
    StateDir.open(d, library=lib).close()


def _run_fails(lib, d: Path, match: str):
    sess = _graph(lib)
    with StateDir.open(d, library=lib) as s:
        s.begin_step()
        with pytest.raises(Exception, match=match) as info:
            sess.run(None, {"x": np.ones((2, 3), np.float32)})
    return str(info.value)


def _wfile(lib, d: Path, gen: int) -> Path:
    return d / statedir.gen_dir_name(gen) / statedir.file_name("w", lib)


def test_truncated_file_fails_the_step_naming_it(lib, tmp_path):
    d = _init(lib, tmp_path / "s")
    f = _wfile(lib, d, 0)
    os.truncate(f, f.stat().st_size - 1)
    msg = _run_fails(lib, d, "truncated or torn")
    assert str(f) in msg and "StateRead[key=w]" in msg


def test_flipped_byte_fails(lib, tmp_path):
    d = _init(lib, tmp_path / "s")
    f = _wfile(lib, d, 0)
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x40  # payload
    f.write_bytes(bytes(data))
    assert str(f) in _run_fails(lib, d, "fails its payload check")
    data[-1] ^= 0x40
    data[30] ^= 0x01  # header
    f.write_bytes(bytes(data))
    assert str(f) in _run_fails(lib, d, "fails its header check")


def test_file_from_another_state_dir_is_refused(lib, tmp_path):
    d = _init(lib, tmp_path / "s")
    other = _init(lib, tmp_path / "other", w=np.full((2, 3), 7, np.float32))
    shutil.copyfile(_wfile(lib, other, 0), _wfile(lib, d, 0))
    _run_fails(lib, d, "belongs to another state directory")
    with pytest.raises(StateError, match="belongs to another state directory") as info:
        StateDir.open(d, library=lib, lock=False).read("w")
    assert isinstance(info.value, RuntimeFailure) and info.value.exit_code == 9


def test_mixed_generations_are_refused(lib, tmp_path):
    d = _init(lib, tmp_path / "s")
    old = tmp_path / "w-gen0"
    shutil.copyfile(_wfile(lib, d, 0), old)
    sess = _graph(lib)
    with StateDir.open(d, library=lib) as s:
        g, *_ = _step(s, sess)
        s.commit(g)
    shutil.copyfile(old, _wfile(lib, d, 1))
    _run_fails(lib, d, "is of generation 0, expected 1")


def test_file_of_another_key_is_refused(lib, tmp_path):
    d = _init(lib, tmp_path / "s")
    shutil.copyfile(d / "gen-00000000" / statedir.file_name("r", lib), _wfile(lib, d, 0))
    _run_fails(lib, d, "holds tensor 'r', not 'w'")


def test_frozen_file_is_read_only_from_frozen(lib, tmp_path):
    d = _init(lib, tmp_path / "s")
    (d / "frozen" / statedir.file_name("f", lib)).unlink()
    _run_fails(lib, d, "has no value for this tensor")


def test_current_and_manifest_are_checked(lib, tmp_path):
    d = _init(lib, tmp_path / "s")
    cur = json.loads((d / "CURRENT").read_text())
    cur["generation"] = 5
    (d / "CURRENT").write_text(json.dumps(cur))
    with pytest.raises(StateError, match="CURRENT fails its check"):
        StateDir.open(d, library=lib)
    other = _init(lib, tmp_path / "other")
    shutil.copyfile(other / "CURRENT", d / "CURRENT")
    with pytest.raises(StateError, match="fails its check"):
        StateDir.open(d, library=lib)
    (d / "CURRENT").unlink()
    with pytest.raises(StateError, match="CURRENT is missing"):
        StateDir.open(d, library=lib)
    with pytest.raises(StateError, match="not a poetc state directory"):
        StateDir.open(tmp_path, library=lib)


def test_ops_without_configuration_fail_clearly(lib, tmp_path):
    sess = _graph(lib)
    statedir.native(lib).configure(None, None, 0, 0, None, 0)
    with pytest.raises(Exception, match="no state directory is configured"):
        sess.run(None, {"x": np.ones((2, 3), np.float32)})


def test_initial_state_refuses_an_existing_directory(lib, tmp_path):
    d = _init(lib, tmp_path / "s")
    with pytest.raises(StateError, match="exists and is not empty"):
        _init(lib, d)


def test_node_specs():
    assert contract.make_state_read_node_spec(T.FLOAT, "a.w") == ("StateRead", {"key": "a.w"})
    assert contract.make_state_read_node_spec(T.INT64, "s")[0] == "StateRead_int64"
    assert contract.make_state_write_node_spec(T.FLOAT, "a.w") == ("StateWrite", {"key": "a.w"})
    with pytest.raises(ValueError):
        contract.make_state_read_node_spec(T.FLOAT, "")
    with pytest.raises(ValueError):
        contract.make_state_write_node_spec(T.STRING, "x")


def test_advance_without_commit(lib, tmp_path):
    """Steps between commits read the previous step's paged files; a crash returns to the commit."""
    d = _init(lib, tmp_path / "s")
    sess = _graph(lib)
    s = StateDir.open(d, library=lib)
    g, *_ = _step(s, sess)
    s.advance(g)  # step 1: not committed
    assert s.generation == 0 and s.latest == 1
    g, _, again, _ = _step(s, sess)
    np.testing.assert_array_equal(again, np.full((2, 3), 1.5, np.float32))  # read gen 1, uncommitted
    s.write("r", s.read("r"), g)
    s.commit(g)
    assert (s.generation, s.latest, s.generations_on_disk()) == (2, 2, [2])
    g, *_ = _step(s, sess)
    s.advance(g)  # step 3 never committed: a crash here
    s.close()
    s = StateDir.open(d, library=lib)
    assert s.generation == 2 and s.generations_on_disk() == [2]
    np.testing.assert_array_equal(s.read("w"), np.full((2, 3), 3.0, np.float32))
    s.close()
