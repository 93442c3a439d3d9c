"""Issue #14, output directory: poetc only removes what it can prove it wrote (the manifest), never data
that appeared during the run, never the directory holding its input; one compile per -o at a time; the
replace is atomic (renameat2 exchange, or a rename order a re-run repairs).

Most cases drive `poetc.output.OutputTransaction` with a stand-in compile that writes two files (fast);
the issue's own command lines run the real compile."""

from __future__ import annotations

import json
import os

import pytest

from bad_inputs import ROOT
from poetc import output
from poetc.cli import main
from poetc.errors import OutputError

MLP = ROOT / "examples" / "mlp.onnx"


def _fake_compile(out, *, force=False, inputs=(), content="new", during=None):
    with output.OutputTransaction(out, force=force, inputs=inputs) as tx:
        (tx.stage / "report.json").write_text(json.dumps({"content": content}))
        (tx.stage / "sub").mkdir()
        (tx.stage / "sub" / "model.onnx").write_text(content)
        if during:
            during()
        tx.commit()


def _no_hidden_leftovers(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(".poetc-")]


@pytest.fixture(params=["renameat2", "rename-order"])
def rename_mode(request, monkeypatch):
    """Run each case with RENAME_EXCHANGE/NOREPLACE and with the plain-rename fallback."""
    if request.param == "rename-order":
        monkeypatch.setattr(output, "_renameat2", None)
    elif output._renameat2 is None:
        pytest.skip("renameat2 is not available in this C library")
    return request.param


def test_manifest_lists_every_file_and_force_replaces_an_unchanged_output(tmp_path, rename_mode):
    out = tmp_path / "out"
    _fake_compile(out, content="old")
    manifest = output.read_manifest(out)
    assert set(manifest) == {"report.json", "sub/model.onnx"}
    _fake_compile(out, force=True, content="new")
    assert (out / "sub" / "model.onnx").read_text() == "new"
    assert output.foreign_content(out) is None
    assert _no_hidden_leftovers(tmp_path) == []


def test_without_force_an_existing_output_is_refused(tmp_path, rename_mode):
    out = tmp_path / "out"
    _fake_compile(out, content="old")
    with pytest.raises(OutputError, match="already exists"):
        _fake_compile(out)
    assert (out / "sub" / "model.onnx").read_text() == "old"


@pytest.mark.parametrize("tamper", ["extra-file", "changed-file", "missing-file", "no-manifest", "symlink"])
def test_force_refuses_a_directory_it_cannot_prove_it_wrote(tmp_path, tamper, rename_mode):
    out = tmp_path / "out"
    _fake_compile(out, content="old")
    if tamper == "extra-file":
        (out / "precious.txt").write_text("mine")
    elif tamper == "changed-file":
        (out / "sub" / "model.onnx").write_text("edited by hand")
    elif tamper == "missing-file":
        (out / "sub" / "model.onnx").unlink()
    elif tamper == "no-manifest":
        (out / output.MANIFEST).unlink()
    else:
        (out / "link").symlink_to(tmp_path)
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    with pytest.raises(OutputError, match="not written by poetc"):
        _fake_compile(out, force=True)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    assert _no_hidden_leftovers(tmp_path) == []


def test_a_directory_with_report_json_and_other_files_is_not_deleted(tmp_path, capsys):
    """The issue's first command: a report.json is no proof; precious.txt survives, exit 7."""
    d = tmp_path / "d"
    d.mkdir()
    (d / "report.json").write_text("{}")
    (d / "precious.txt").write_text("x\n")
    code = main(["compile", str(MLP), "--ram", "20MB", "--baselines", "", "-o", str(d), "--force"])
    err = capsys.readouterr().err
    assert code == 7, err
    assert "not written by poetc" in err
    assert (d / "precious.txt").read_text() == "x\n"


def test_data_appearing_at_the_output_path_during_the_run_is_kept(tmp_path, rename_mode):
    out = tmp_path / "late"

    def someone_else():
        out.mkdir()
        (out / "precious.txt").write_text("data")

    with pytest.raises(OutputError, match="appeared while poetc was compiling"):
        _fake_compile(out, during=someone_else)
    assert (out / "precious.txt").read_text() == "data"
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    assert _no_hidden_leftovers(tmp_path) == []


def test_data_added_to_the_old_output_during_a_forced_run_is_kept(tmp_path, rename_mode):
    out = tmp_path / "out"
    _fake_compile(out, content="old")

    def someone_else():
        (out / "precious.txt").write_text("data")

    with pytest.raises(OutputError, match="not written by poetc"):
        _fake_compile(out, force=True, during=someone_else)
    assert (out / "precious.txt").read_text() == "data"
    assert (out / "sub" / "model.onnx").read_text() == "old"


def test_unknown_files_in_a_replaced_output_are_moved_aside_not_deleted(tmp_path):
    """The last line of defence (data written between the final check and the swap): removing the old
    output deletes only files matching the manifest; the rest is kept in a visible directory."""
    out = tmp_path / "out"
    _fake_compile(out, content="old")
    (out / "late.txt").write_text("data")
    output._remove_verified(out, tmp_path / "out")
    kept = tmp_path / "out.poetc-kept-1"
    assert not out.exists() and sorted(p.name for p in kept.iterdir()) == ["late.txt"]


def test_never_replaces_the_directory_holding_the_input(tmp_path, capsys):
    """`-o` the directory of the model itself, with --force: refused before any work, input intact."""
    out = tmp_path / "out"
    _fake_compile(out, content="old")
    model = out / "sub" / "model.onnx"
    with pytest.raises(OutputError, match="holds this compile's input"):
        _fake_compile(out, force=True, inputs=[model])
    assert model.read_text() == "old"
    # through the CLI: the model file is an input inside -o
    code = main(["compile", str(model), "--ram", "20MB", "-o", str(out), "--force"])
    assert code == 7 and "holds this compile's input" in capsys.readouterr().err
    assert model.read_text() == "old"


def test_a_second_compile_to_the_same_output_fails_while_the_first_holds_the_lock(tmp_path):
    out = tmp_path / "out"
    with output.OutputLock(out):
        with pytest.raises(OutputError, match="another poetc compile is writing"):
            _fake_compile(out)
        assert not out.exists()
    _fake_compile(out)  # released: the next one goes ahead
    assert not (tmp_path / f".poetc-lock-{out.name}").exists()


def test_concurrent_cli_compiles_to_one_output_one_wins(tmp_path, capsys):
    """The CLI loser of the lock exits 7 with one paragraph (the lock is held here as a compile would)."""
    out = tmp_path / "out"
    with output.OutputLock(out):
        code = main(["compile", str(MLP), "--ram", "20MB", "--baselines", "", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 7 and "another poetc compile is writing" in err
    assert not out.exists()


def test_a_crash_between_the_two_renames_is_repaired_by_the_next_run(tmp_path, monkeypatch):
    """Fallback order: out -> .poetc-old-out, stage -> out. Killed between them, the old output sits
    complete at .poetc-old-out; the next compile (even one that then fails) moves it back first."""
    monkeypatch.setattr(output, "_renameat2", None)
    out = tmp_path / "out"
    _fake_compile(out, content="old")
    real_rename = os.rename
    calls = []

    def crash_on_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands in for SIGKILL: nothing after this line runs
        real_rename(src, dst)

    monkeypatch.setattr(output.os, "rename", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        _fake_compile(out, force=True, content="new")
    monkeypatch.setattr(output.os, "rename", real_rename)
    assert not out.exists()
    old = tmp_path / ".poetc-old-out"
    assert (old / "sub" / "model.onnx").read_text() == "old" and output.foreign_content(old) is None
    with pytest.raises(OutputError, match="already exists"):
        _fake_compile(out)  # repair first, then the usual refusal
    assert (out / "sub" / "model.onnx").read_text() == "old" and not old.exists()
    _fake_compile(out, force=True, content="new")
    assert (out / "sub" / "model.onnx").read_text() == "new"
    assert _no_hidden_leftovers(tmp_path) == []


def test_a_replaced_output_left_by_a_crash_after_the_swap_is_removed_by_the_next_run(tmp_path, monkeypatch):
    monkeypatch.setattr(output, "_renameat2", None)
    out = tmp_path / "out"
    _fake_compile(out, content="old")
    monkeypatch.setattr(output, "_remove_verified", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        _fake_compile(out, force=True, content="new")
    monkeypatch.undo()
    assert (out / "sub" / "model.onnx").read_text() == "new"
    assert (tmp_path / ".poetc-old-out").exists()
    _fake_compile(out, force=True, content="newer")
    assert _no_hidden_leftovers(tmp_path) == []


def test_output_directory_gets_the_umask_mode_not_0700(tmp_path):
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        _fake_compile(out)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755


def test_a_directory_appearing_between_the_last_check_and_the_rename_is_kept(tmp_path, monkeypatch):
    """RENAME_NOREPLACE closes the last window: the install fails instead of replacing the newcomer."""
    if output._renameat2 is None:
        pytest.skip("renameat2 is not available in this C library")
    out = tmp_path / "out"
    real = output._rename2

    def racing(src, dst, flags):
        if flags == output._RENAME_NOREPLACE:
            dst.mkdir()
            (dst / "precious.txt").write_text("data")
        return real(src, dst, flags)

    monkeypatch.setattr(output, "_rename2", racing)
    with pytest.raises(OutputError, match="appeared while poetc was compiling"):
        _fake_compile(out)
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    assert _no_hidden_leftovers(tmp_path) == []
