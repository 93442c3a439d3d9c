import pytest

from poetc.errors import UsageError
from poetc.units import Deadline, parse_deadline, parse_size, parse_time


@pytest.mark.parametrize("text,expected", [
    ("8MB", 8_000_000), ("8MiB", 8 * 2**20), ("512kB", 512_000), ("512KiB", 512 * 1024),
    ("1.5GB", 1_500_000_000), ("4096", 4096), ("4096B", 4096), (".5MB", 500_000),
])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["8 MB", "8mb", "-1MB", "1e3MB", "12parsecs", "", "MB", "0MB", " 8MB"])
def test_bad_sizes_name_the_value(text):
    with pytest.raises(UsageError) as err:
        parse_size(text, what="--ram")
    assert "--ram" in str(err.value)


def test_times_and_deadlines():
    assert parse_time("250ms") == pytest.approx(0.25)
    assert parse_time("2min") == 120
    assert parse_deadline("1.3x") == Deadline(factor=1.3)
    assert parse_deadline("2s").resolve(1.0) == 2.0
    assert parse_deadline("1.5x").resolve(2.0) == 3.0
    for bad in ("0.5x", "fast", "-2s", "3 s"):
        with pytest.raises(UsageError):
            parse_deadline(bad)
