"""Crash safety of `poetc train` on a state directory (issue #17): SIGKILL at random (seeded) moments, then
resume; every committed step holds exactly the parameters and moments of an uninterrupted run at that step.
Also: a damaged state directory (truncated file, flipped byte, a file from another state directory, a file
of an older generation, a replaced CURRENT) makes `poetc train` exit 9 and trains nothing on it, and
`poetc export` writes the committed step of a state directory.

Kills at fixed points of a step (POETC_TEST_KILL_AT, a test-only hook of the runtime: docs/state.md) land
whatever the machine's speed; the random-time campaigns scale their moments by an uninterrupted run's wall
time.

The output is examples/mlp.onnx (batch 512) compiled in the fused optimizer mode with net.4.* frozen, then
paged by hand (tests/statepaging.py): net.2.weight and net.0.bias with their moments, and the frozen
net.4.weight, are StateRead/StateWrite'd; everything else is resident. One ORT thread: bitwise reproducible.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bad_inputs import ROOT
from poetc.runtime import statedir
from poetc.runtime.statedir import StateDir

MLP = ROOT / "examples" / "mlp.onnx"
PAGED = ["net.2.weight", "net.0.bias", "net.4.weight"]


def _poetc(*args: str, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "poetc", *args], capture_output=True, text=True, env=env,
                          timeout=900, **kw)


@pytest.fixture(scope="module")
def paged_out(tmp_path_factory) -> tuple[Path, Path]:
    from poetc.api import CompileOptions, compile_model
    from poetc.importer import ImportOptions
    from statepaging import page_by_hand
    out = tmp_path_factory.mktemp("kill") / "out"
    try:
        compile_model(MLP, CompileOptions(ram_bytes=40_000_000, out_dir=out, baselines=(), optimizer_mode="fused",
                                          import_options=ImportOptions(freeze=["net.4.*"])))
    except Exception as exc:  # noqa: BLE001 - e.g. the op library cannot be built here
        pytest.skip(f"cannot compile examples/mlp.onnx in the fused mode here: {exc}")
    lib = out / "libpoet_spill.so"
    paged = page_by_hand(out, PAGED, lib)
    assert "net.4.weight__poet_m1" not in paged  # frozen: no moments
    return out, lib


@pytest.fixture(scope="module")
def compiled_paged_out(tmp_path_factory) -> tuple[Path, Path]:
    """examples/mlp.onnx compiled by poetc itself into a paged schedule (the compiler's paging rewrite):
    at 12 MB with a loose deadline the MILP pages AdamW moments of the large layers."""
    from poetc.api import CompileOptions, compile_model
    from poetc.runtime.statedir import StateDir
    from poetc.units import parse_deadline
    out = tmp_path_factory.mktemp("kill-compiled") / "out"
    try:
        compile_model(MLP, CompileOptions(ram_bytes=12_000_000, out_dir=out, baselines=(), optimizer_mode="fused",
                                          deadline=parse_deadline("20x")))
    except Exception as exc:  # noqa: BLE001 - e.g. the op library cannot be built here
        pytest.skip(f"cannot compile a paged schedule of examples/mlp.onnx here: {exc}")
    lib = out / "libpoet_spill.so"
    with StateDir.open(out / "initial_state", library=lib, lock=False, clean=False) as s:
        assert any(i.paged for i in s.tensors.values()), "the 12 MB schedule pages nothing: the premise changed"
    return out, lib


@pytest.fixture(scope="module")
def sliced_paged_out(tmp_path_factory) -> tuple[Path, Path]:
    """examples/mlp.onnx at batch 512 compiled by poetc at 8 MB: the first layer's AdamW update is sliced
    (its moments are slice tensors, paged one by one), with the default (soft) deadline."""
    from poetc.api import CompileOptions, compile_model
    from poetc.importer import ImportOptions
    out = tmp_path_factory.mktemp("kill-sliced") / "out"
    try:
        report = compile_model(MLP, CompileOptions(ram_bytes=8_000_000, out_dir=out, baselines=(),
                                                   import_options=ImportOptions(batch=512))).report
    except Exception as exc:  # noqa: BLE001 - e.g. the op library cannot be built here
        pytest.skip(f"cannot compile examples/mlp.onnx at 8 MB here: {exc}")
    assert report.update_slices, "the 8 MB schedule slices no update: the premise changed"
    assert any(s["paged"] and s["parent"] for s in report.state_tensors), "no moment slice is paged"
    return out, out / "libpoet_spill.so"


def _reference(out: Path, lib: Path, tmp: Path, steps: int) -> StateDir:
    """An uninterrupted run that keeps every generation."""
    from poetc.run import train
    ref = tmp / "ref"
    doc = train(out, steps=steps, state=ref, threads=1, keep_generations=True)
    assert doc["created"] and doc["final_step"] == steps and doc["steps_run"] == list(range(steps))
    s = StateDir.open(ref, library=lib, lock=False, clean=False)
    assert s.generations_on_disk() == list(range(steps + 1))
    return s


def _assert_same_as_reference(d: Path, ref: StateDir, lib: Path) -> int:
    """Wait for the lock (a killed poetc's worker dies a moment later), then compare every tensor of the
    committed step with the reference's at that step, bit for bit. Returns (step, uncommitted gen dirs)."""
    with StateDir.open(d, library=lib, lock_wait_s=120, clean=False) as s:
        k = s.generation
        leftovers = [g for g in s.generations_on_disk() if g != k]
        for name in sorted(s.tensors):
            a, b = s.read(name), ref.read(name, generation=k)
            assert a.tobytes() == b.tobytes(), f"{name} differs from the uninterrupted run at step {k}"
    return k, leftovers


def _kill_campaign(paged_out, tmp_path, kills: int, steps: int, seed: int, commit_every: int = 1) -> dict:
    out, lib = paged_out
    ref = _reference(out, lib, tmp_path, steps)
    # an uninterrupted CLI run: equal to the reference, and its wall time scales the kill moments
    t0 = time.monotonic()
    full = _poetc("train", str(out), "--state", str(tmp_path / "full"), "--steps", str(steps), "--threads", "1")
    wall = time.monotonic() - t0
    assert full.returncode == 0, full.stderr
    assert "created the state directory" in full.stdout and f"is at step {steps} (committed)" in full.stdout
    assert _assert_same_as_reference(tmp_path / "full", ref, lib)[0] == steps

    rng = random.Random(seed)
    d = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    seen, mid_step, done, landed, tries = [], 0, 0, 0, 0
    while landed < kills:  # a kill counts when it hit a running `poetc train` (some finish first)
        tries += 1
        assert tries <= 4 * kills, f"only {landed} of {tries} SIGKILLs hit a running poetc train"
        proc = subprocess.Popen([sys.executable, "-m", "poetc", "train", str(out), "--state", str(d), "--steps",
                                 str(steps), "--threads", "1", "--commit-every", str(commit_every)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        time.sleep(rng.uniform(0.0, wall))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        if proc.returncode == -signal.SIGKILL:
            landed += 1
        else:
            assert proc.returncode == 0
            done += 1
        if statedir.is_state_dir(d):
            k, leftovers = _assert_same_as_reference(d, ref, lib)
            assert k % commit_every == 0 or k == steps, f"step {k} was committed with --commit-every {commit_every}"
            seen.append(k)
            mid_step += bool(leftovers)
            if k == steps:
                shutil.rmtree(d)  # start the next kills from a fresh directory
    # the last run is not killed: it resumes and reaches the end equal to the uninterrupted run
    start = statedir.committed_step(d) if statedir.is_state_dir(d) else None
    last = _poetc("train", str(out), "--state", str(d), "--steps", str(steps), "--threads", "1")
    assert last.returncode == 0, last.stderr
    if start is None:
        assert "created the state directory" in last.stdout
    else:
        assert f"resumed from step {start} of {d}" in last.stdout
    assert _assert_same_as_reference(d, ref, lib)[0] == steps
    summary = {"kills": landed, "steps": steps, "commit_every": commit_every, "committed_steps_seen": seen, "kills_leaving_another_generation_dir":
               mid_step, "runs_finished_before_kill": done, "uninterrupted_wall_s": round(wall, 2)}
    print(f"kill campaign: {summary}")
    return summary


def test_resume_equals_uninterrupted(paged_out, tmp_path):
    out, lib = paged_out
    ref = _reference(out, lib, tmp_path, 4)
    d = tmp_path / "s"
    first = _poetc("train", str(out), "--state", str(d), "--steps", "2", "--threads", "1")
    assert first.returncode == 0, first.stderr
    assert "step 0:" in first.stdout and "step 1:" in first.stdout
    second = _poetc("train", str(out), "--state", str(d), "--steps", "4", "--threads", "1")
    assert second.returncode == 0, second.stderr
    assert f"resumed from step 2 of {d}" in second.stdout and "step 2:" in second.stdout and "step 0:" not in second.stdout
    assert _assert_same_as_reference(d, ref, lib)[0] == 4
    again = _poetc("train", str(out), "--state", str(d), "--steps", "3", "--threads", "1")
    assert again.returncode == 0 and "is at step 4" in again.stdout  # nothing left to do
    # the resumed state moved: the test compares trained values, not the initial ones
    init = StateDir.open(out / "initial_state", library=lib, lock=False, clean=False)
    with StateDir.open(d, library=lib) as s:
        assert s.read("net.2.weight").tobytes() != init.read("net.2.weight").tobytes()
        assert s.read("net.4.weight").tobytes() == init.read("net.4.weight").tobytes()  # frozen


def _state_write_order(out: Path) -> list[str]:
    """The keys of the compiled graph's StateWrites in node (= execution) order."""
    import onnx
    m = onnx.load(str(out / "training_model.onnx"), load_external_data=False)
    return [next(a.s.decode() for a in n.attribute if a.name == "key") for n in m.graph.node
            if n.op_type == "StateWrite"]


def test_kill_at_fixed_points_of_a_sliced_schedule(sliced_paged_out, tmp_path):
    """SIGKILLs at fixed points (POETC_TEST_KILL_AT, honoured by the runtime: they land whatever the
    machine's speed) of `poetc train` on the sliced 8 MB schedule: after a StateRead, between the
    StateWrites of two slices of one moment (one slice written for the next generation, the other
    not), while persisting the resident state, between fsync and the rename of CURRENT, and just after
    it. Each resume is at the expected step with every tensor, every slice included, bitwise the
    uninterrupted run's at that step."""
    out, lib = sliced_paged_out
    writes = _state_write_order(out)
    first_slice = next(i for i, k in enumerate(writes) if k.endswith("__s0"))
    assert any(k.endswith("__s1") for k in writes[first_slice + 1:]), writes  # another slice written later
    steps = 5
    ref = _reference(out, lib, tmp_path, steps)
    d = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # (generation the killed step writes, phase, n, step committed after the kill)
    points = [(1, "read", 1, 0), (2, "write", first_slice + 1, 1), (2, "persist", 1, 1), (2, "commit", 0, 1),
              (2, "commit", 1, 2), (4, "write", len(writes), 3)]
    for gen, phase, n, committed in points:
        proc = subprocess.run([sys.executable, "-m", "poetc", "train", str(out), "--state", str(d), "--steps",
                               str(steps), "--threads", "1"], capture_output=True, text=True, timeout=900,
                              env=dict(env, POETC_TEST_KILL_AT=f"{gen}:{phase}:{n}"))
        assert proc.returncode != 0, f"the kill at {gen}:{phase}:{n} did not happen: {proc.stdout}"
        k, _ = _assert_same_as_reference(d, ref, lib)
        assert k == committed, f"after a kill at {gen}:{phase}:{n}: committed step {k}, expected {committed}"
    last = _poetc("train", str(out), "--state", str(d), "--steps", str(steps), "--threads", "1")
    assert last.returncode == 0, last.stderr
    assert f"resumed from step 3 of {d}" in last.stdout
    assert _assert_same_as_reference(d, ref, lib)[0] == steps


def test_kill_fast(paged_out, tmp_path):
    _kill_campaign(paged_out, tmp_path, kills=5, steps=6, seed=1)


@pytest.mark.slow
def test_kill_many(paged_out, tmp_path):
    _kill_campaign(paged_out, tmp_path, kills=25, steps=16, seed=17)


@pytest.mark.slow
def test_kill_many_commit_every_3(paged_out, tmp_path):
    _kill_campaign(paged_out, tmp_path, kills=20, steps=16, seed=29, commit_every=3)


@pytest.mark.slow
def test_kill_many_compiled_schedule(compiled_paged_out, tmp_path):
    _kill_campaign(compiled_paged_out, tmp_path, kills=25, steps=16, seed=23)


@pytest.mark.slow
def test_kill_many_sliced_schedule(sliced_paged_out, tmp_path):
    _kill_campaign(sliced_paged_out, tmp_path, kills=20, steps=12, seed=31)


# ---------------------------------------------------------------------------------------------------
# damaged state directories: exit 9, nothing trained


def _trained(paged_out, tmp_path, steps=2) -> Path:
    out, _ = paged_out
    d = tmp_path / "s"
    r = _poetc("train", str(out), "--state", str(d), "--steps", str(steps), "--threads", "1")
    assert r.returncode == 0, r.stderr
    return d


def _file(lib, d: Path, name: str, gen: int) -> Path:
    return d / statedir.gen_dir_name(gen) / statedir.file_name(name, lib)


def _refused(paged_out, d: Path, match: str) -> str:
    out, _ = paged_out
    before = (d / "CURRENT").read_bytes()
    r = _poetc("train", str(out), "--state", str(d), "--steps", "4", "--threads", "1")
    assert r.returncode == 9, (r.returncode, r.stdout, r.stderr)
    assert match in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert (d / "CURRENT").read_bytes() == before  # never trained on: still the same committed step
    return r.stderr


@pytest.mark.parametrize("name", ["net.2.weight", "net.0.weight"])  # paged (StateRead) and resident (Python)
def test_truncated_file_exits_9(paged_out, tmp_path, name):
    d = _trained(paged_out, tmp_path)
    f = _file(paged_out[1], d, name, 2)
    os.truncate(f, f.stat().st_size - 4)
    assert str(f) in _refused(paged_out, d, "truncated or torn")


def test_flipped_byte_exits_9(paged_out, tmp_path):
    d = _trained(paged_out, tmp_path)
    f = _file(paged_out[1], d, "net.2.weight__poet_m1", 2)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))
    assert str(f) in _refused(paged_out, d, "fails its payload check")


def test_file_from_another_state_dir_exits_9(paged_out, tmp_path):
    d = _trained(paged_out, tmp_path)
    other = _trained(paged_out, tmp_path / "other")  # same model, same step, another directory (another key)
    for name in ("net.2.weight", "net.6.bias"):
        shutil.copyfile(_file(paged_out[1], other, name, 2), _file(paged_out[1], d, name, 2))
    _refused(paged_out, d, "belongs to another state directory")


def test_mixed_generations_exit_9(paged_out, tmp_path):
    out, lib = paged_out
    d = _trained(paged_out, tmp_path, steps=1)
    old = tmp_path / "gen1-file"
    shutil.copyfile(_file(lib, d, "net.0.bias", 1), old)
    r = _poetc("train", str(out), "--state", str(d), "--steps", "2", "--threads", "1")
    assert r.returncode == 0, r.stderr
    shutil.copyfile(old, _file(lib, d, "net.0.bias", 2))
    _refused(paged_out, d, "is of generation 1, expected 2")


def test_replaced_current_exits_9(paged_out, tmp_path):
    d = _trained(paged_out, tmp_path)
    other = _trained(paged_out, tmp_path / "other")
    shutil.copyfile(other / "CURRENT", d / "CURRENT")
    _refused(paged_out, d, "fails its check")


def test_not_a_state_dir_is_left_untouched(paged_out, tmp_path):
    out, _ = paged_out
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    r = _poetc("train", str(out), "--state", str(d), "--steps", "1")
    assert r.returncode == 7 and "not a poetc state directory" in r.stderr
    assert (d / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------------
# export


def test_export_reads_the_committed_step(paged_out, tmp_path):
    from onnxruntime.training.api import CheckpointState
    out, lib = paged_out
    d = _trained(paged_out, tmp_path, steps=3)
    r = _poetc("export", str(out), "--state", str(d), "-o", str(tmp_path / "exp"))
    assert r.returncode == 0, r.stderr
    assert "step 3" in r.stdout
    ck = CheckpointState.load_checkpoint(str(tmp_path / "exp" / "checkpoint"))
    exported = {n: (np.array(p.data), bool(p.requires_grad)) for n, p in ck.parameters}
    with StateDir.open(d, library=lib) as s:
        params = [n for n in s.tensors if "__poet_" not in n]
        assert sorted(exported) == sorted(params)
        for n in params:
            assert exported[n][0].tobytes() == s.read(n).tobytes()
            assert exported[n][1] == (not n.startswith("net.4."))
    import onnxruntime as ort
    sess = ort.InferenceSession(str(tmp_path / "exp" / "inference_model.onnx"), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"input": np.zeros((512, 784), np.float32)})
    assert y.shape == (512, 10)


def test_state_of_another_output_is_refused(paged_out, tmp_path):
    from statepaging import page_by_hand
    out, lib = paged_out
    other = tmp_path / "other-out"
    shutil.copytree(out, other)
    page_by_hand(other, ["net.6.weight"], lib)  # another training graph
    d = _trained(paged_out, tmp_path, steps=1)
    before = (d / "CURRENT").read_bytes()
    r = _poetc("train", str(other), "--state", str(d), "--steps", "2")
    assert r.returncode == 2 and "created for another compile output" in r.stderr, r.stderr
    assert (d / "CURRENT").read_bytes() == before
