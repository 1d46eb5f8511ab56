"""quantbench.cpu: what the CPU offers (VNNI, bf16), read from /proc/cpuinfo's flags."""
from __future__ import annotations

import pytest

from quantbench import cpu


def _pretend(monkeypatch, flags: set[str], machine: str = "x86_64") -> None:
    monkeypatch.setattr(cpu, "_read_flags", lambda: frozenset(flags))
    monkeypatch.setattr(cpu.platform, "machine", lambda: machine)


@pytest.mark.parametrize("flags,machine,has", [
    ({"avx2", "fma"}, "x86_64", False),                      # this project's machine: AVX2 only
    ({"avx2", "avx512f", "avx512_vnni"}, "x86_64", False),   # VNNI is int8's, not bf16
    ({"avx512f", "avx512_bf16"}, "x86_64", True),            # Cooper Lake, Zen 4
    ({"avx512f", "amx_bf16", "amx_tile"}, "x86_64", True),   # Sapphire Rapids' AMX
    ({"asimd", "asimddp"}, "aarch64", False),
    ({"asimd", "bf16"}, "aarch64", True),                    # arm64 spells it "bf16"
    (set(), "x86_64", False),                                # no /proc/cpuinfo (macOS): no bf16 rows
])
def test_has_bf16_reads_the_flags(monkeypatch, flags, machine, has):
    _pretend(monkeypatch, flags, machine)
    assert cpu.has_bf16() is has
    why = cpu.bf16_missing()
    assert (why is None) is has
    if not has:  # one line that says what is missing
        assert why.startswith("bf16 rows skipped: this CPU has no ") and "\n" not in why
        assert ("AVX512-BF16 or AMX" in why) is (machine == "x86_64")


def test_the_machine_record_says_whether_there_is_bf16(monkeypatch):
    _pretend(monkeypatch, {"avx2", "amx_bf16"})
    rec = cpu.machine_record(threads=1)
    assert rec["bf16"] is True and rec["isa"]["amx_bf16"] is True and rec["isa"]["avx512_bf16"] is False
