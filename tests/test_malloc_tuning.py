"""ormo_ps.common.malloc_tuning: applied on glibc, off with PS_MALLOC_TUNING=0, never an error."""

from __future__ import annotations

import platform

import pytest

from ormo_ps.common.malloc_tuning import tune_malloc


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_accepts_the_settings() -> None:
    assert tune_malloc() is True


def test_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PS_MALLOC_TUNING", "0")
    assert tune_malloc() is False
