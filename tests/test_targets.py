"""Device targets: packaged TOML files, the loader's validation, and paging costs."""

from __future__ import annotations

import dataclasses
import math
from importlib import resources

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poetc.errors import TargetError
from poetc.targets import Target, known_target_names, list_targets, load_target, parse_target

EXPECTED = {"m0", "m4f", "rpi4", "jetson-tx2", "host"}
FIGURES = ("ram_bytes", "flash_bytes", "flops_per_s", "active_power_w", "mem_bytes_per_s",
           "page_in_bytes_per_s", "page_in_latency_s", "page_out_bytes_per_s",
           "page_out_latency_s", "storage_power_w")


def _m0_text() -> str:
    return (resources.files("poetc.targets") / "m0.toml").read_text(encoding="utf-8")


def test_all_packaged_targets_load():
    assert set(known_target_names()) == EXPECTED
    targets = list_targets()
    assert [t.name for t in targets] == sorted(EXPECTED)
    for t in targets:
        assert isinstance(t, Target)
        assert load_target(t.name) == t


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_figure_positive_and_cited(name):
    t = load_target(name)
    for figure in FIGURES:
        value = getattr(t, figure)
        assert value > 0 and math.isfinite(value), figure
        assert t.source(figure), f"{name}: no citation for {figure}"
    assert isinstance(t.ram_bytes, int) and isinstance(t.flash_bytes, int)
    assert t.description and t.storage_medium
    assert t.energy_per_flop_j == pytest.approx(t.active_power_w / t.flops_per_s)


def test_poet_figures_reproduced():
    m0, m4f, rpi4, tx2 = (load_target(n) for n in ("m0", "m4f", "rpi4", "jetson-tx2"))
    # POET chipsets.py: MKR1000 FLOPS = 2000/0.012, FLOPS_PER_WATT = 2000/(0.012*0.020*3.3)
    assert m0.flops_per_s == pytest.approx(2000 / 0.012, rel=1e-3)
    assert m0.flops_per_j == pytest.approx(2000 / (0.012 * 0.020 * 3.3), rel=1e-3)  # 2.53e6
    assert m0.active_power_w == pytest.approx(0.066)
    # M4F: 6.37 MFLOP/s, 5.80e8 FLOP/J at 3.328 mA x 3.3 V
    assert m4f.flops_per_s == pytest.approx(6.37e6, rel=1e-3)
    assert m4f.flops_per_j == pytest.approx(5.80e8, rel=2e-3)
    # RPi: 2e9 FLOP/s kept for time; energy follows from 3 W (not POET's 4.01e7 FLOP/J)
    assert rpi4.flops_per_s == 2e9 and rpi4.active_power_w == 3.0
    assert rpi4.flops_per_j == pytest.approx(2e9 / 3.0)
    assert (rpi4.page_in_bytes_per_s, rpi4.page_out_bytes_per_s) == (45.5e6, 24.5e6)
    # TX2 storage and power from POET
    assert tx2.active_power_w == pytest.approx(0.766)
    assert tx2.page_in_latency_s == pytest.approx(0.54e-3)
    assert tx2.page_out_latency_s == pytest.approx(2.396e-3)
    assert tx2.storage_power_w == pytest.approx(0.309)
    # the SD card is shared by the two microcontrollers
    assert m0.page_in(4096) == m4f.page_in(4096)
    assert load_target("host").is_measured and not rpi4.is_measured


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_page_energy_formula(name):
    t = load_target(name)
    for n in (1, 4096, 10**6):
        time_in, energy_in = t.page_in(n)
        assert time_in == pytest.approx(t.page_in_latency_s + n / t.page_in_bytes_per_s)
        assert energy_in == pytest.approx((t.page_in_latency_s + n / t.page_in_bytes_per_s) * t.storage_power_w)
        time_out, energy_out = t.page_out(n)
        assert time_out == pytest.approx(t.page_out_latency_s + n / t.page_out_bytes_per_s)
        assert energy_out == pytest.approx(time_out * t.storage_power_w)
    assert t.page_in(0) == (0.0, 0.0) and t.page_out(0) == (0.0, 0.0)
    with pytest.raises(ValueError):
        t.page_out(-1)


def test_m0_page_energy_by_hand():
    # 1 MB from POET's SD card: (0.109 ms + 1e6 / 4.61651e6 s) x 0.33 W
    seconds, joules = load_target("m0").page_in(10**6)
    assert seconds == pytest.approx(0.109e-3 + 1e6 / 4.61651e6)
    assert joules == pytest.approx(seconds * 0.33)


@settings(max_examples=50, deadline=None)
@given(a=st.integers(min_value=1, max_value=10**10), b=st.integers(min_value=1, max_value=10**10))
def test_paging_is_monotone_and_affine(a, b):
    t = load_target("rpi4")
    lo, hi = sorted((a, b))
    assert t.page_out(lo)[0] <= t.page_out(hi)[0]
    assert t.page_in(lo)[1] <= t.page_in(hi)[1]
    # one transfer of a+b bytes saves exactly one latency over two transfers
    assert t.page_in(a)[0] + t.page_in(b)[0] == pytest.approx(t.page_in(a + b)[0] + t.page_in_latency_s)


def test_name_normalisation_and_path(tmp_path):
    assert load_target("JETSON_TX2").name == "jetson-tx2"
    path = tmp_path / "mine.toml"
    path.write_text(_m0_text().replace('name = "m0"', 'name = "mine"'))
    t = load_target(path)
    assert t.name == "mine" and t.path == str(path)
    assert load_target(str(path)) == t


def test_target_is_frozen():
    t = load_target("m4f")
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.flops_per_s = 1.0  # type: ignore[misc]


def test_unknown_name_lists_known_targets():
    with pytest.raises(TargetError) as info:
        load_target("cray-1")
    message = str(info.value)
    assert "cray-1" in message
    for name in EXPECTED:
        assert name in message
    assert info.value.exit_code == 5


def test_missing_file(tmp_path):
    with pytest.raises(TargetError, match="nope.toml"):
        load_target(tmp_path / "nope.toml")


@pytest.mark.parametrize("edit, field", [
    (lambda s: s.replace("flops_per_s = 1.6667e5\n", ""), "compute.flops_per_s"),
    (lambda s: s.replace("flops_per_s = 1.6667e5", "flops_per_s = -1.0"), "compute.flops_per_s"),
    (lambda s: s.replace("flops_per_s = 1.6667e5", "flops_per_s = 0"), "compute.flops_per_s"),
    (lambda s: s.replace("flops_per_s = 1.6667e5", 'flops_per_s = "fast"'), "compute.flops_per_s"),
    (lambda s: s.replace("page_in_latency_s = 1.09e-4", "page_in_latency_s = nan"), "storage.page_in_latency_s"),
    (lambda s: s.replace("ram_bytes = 32768", "ram_bytes = 32768.5"), "ram_bytes"),
    (lambda s: s.replace("ram_bytes = 32768", "ram_bytes = true"), "ram_bytes"),
    (lambda s: s.replace("storage_power_w = 0.33\n", "storage_power_w = 0.33\nspeed = 3\n", 1), "storage.speed"),
    (lambda s: s.replace('cost_model = "analytic"', 'cost_model = "guess"'), "compute.cost_model"),
    (lambda s: s.replace("energy_per_flop_j = 3.96e-7", "energy_per_flop_j = 2.49e-8"), "compute.energy_per_flop_j"),
    (lambda s: s[: s.index("[sources]")], "sources"),
    (lambda s: s.replace("\nstorage_power_w = \"POET", "\nunused = \"POET"), "sources.storage_power_w"),
    (lambda s: s.replace('name = "m0"\n', ""), "name"),
])
def test_malformed_fields_are_named(tmp_path, edit, field):
    path = tmp_path / "bad.toml"
    text = edit(_m0_text())
    assert text != _m0_text()
    path.write_text(text)
    with pytest.raises(TargetError) as info:
        load_target(path)
    assert str(path) in str(info.value)
    assert repr(field) in str(info.value) or field in str(info.value)


def test_malformed_toml_names_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("name = \"x\"\n[compute\nflops_per_s = 1\n")
    with pytest.raises(TargetError, match="broken.toml.*malformed TOML"):
        load_target(path)


def test_parse_target_origin_in_errors():
    with pytest.raises(TargetError, match="<inline>"):
        parse_target("name = 'x'", "<inline>")


def test_roofline_time():
    t = load_target("rpi4")
    assert t.compute_time_s(2e9, 0) == pytest.approx(1.0)  # compute-bound
    assert t.compute_time_s(1, 5.5e9) == pytest.approx(1.0)  # memory-bound


def test_summary_mentions_figures():
    text = load_target("rpi4").summary()
    assert "rpi4" in text and "FLOP/s" in text and "page-in" in text
