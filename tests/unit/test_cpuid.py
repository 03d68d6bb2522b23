"""CPU templates: which bits `minimal` hides, APIC IDs per vCPU."""
import pytest

from vmm.arch.x86 import cpuid

ALL = 0xFFFFFFFF


def supported():
    return [dict(function=f, index=i, flags=0, eax=ALL, ebx=ALL, ecx=ALL, edx=ALL)
            for f, i in ((0, 0), (1, 0), (7, 0), (7, 1), (0xB, 0), (0xD, 0), (0xD, 1),
                         (0x80000001, 0))]


def leaf(table, fn, idx=0):
    return next(e for e in table if e["function"] == fn and e["index"] == idx)


def test_host_template_passes_through():
    t = cpuid.apply_template(supported(), "host", 0, 1)
    assert leaf(t, 1)["ecx"] == ALL and leaf(t, 7)["ebx"] == ALL
    assert any(e["function"] == 0xD for e in t)


def test_minimal_hides_the_unemulated_features():
    t = cpuid.apply_template(supported(), "minimal", 0, 1)
    ecx1 = leaf(t, 1)["ecx"]
    for bit in (13, 23, 26, 27, 28):            # CX16 POPCNT XSAVE OSXSAVE AVX
        assert not ecx1 & (1 << bit), bit
    assert ecx1 & (1 << 0)                      # SSE3 stays
    ebx7 = leaf(t, 7)["ebx"]
    for bit in (5, 7, 16, 20):                  # AVX2 SMEP AVX512F SMAP
        assert not ebx7 & (1 << bit), bit
    assert ebx7 & (1 << 0)                      # FSGSBASE stays
    assert not any(e["function"] == 0xD for e in t)
    assert leaf(t, 0)["eax"] == ALL


def test_minimal_adds_kernel_parameters():
    assert "noxsave" in cpuid.kernel_args("minimal")
    assert "clearcpuid=" in cpuid.kernel_args("minimal")
    assert cpuid.kernel_args("host") == ""


def test_minimal_keeps_guest_glibc_off_avx():
    """noxsave guests do not save YMM/ZMM state: glibc in the guest must not
    pick AVX routines (one NAME=VALUE word, which the kernel gives init as an
    environment variable)."""
    words = cpuid.kernel_args("minimal").split()
    tun = [w for w in words if w.startswith("GLIBC_TUNABLES=")]
    assert len(tun) == 1 and tun[0].count("=") == 2
    caps = tun[0].split("glibc.cpu.hwcaps=", 1)[1].split(",")
    assert {"-AVX", "-AVX2", "-AVX512F", "-AVX512VL"} <= set(caps)


@pytest.mark.parametrize("index", [0, 3])
def test_apic_ids_and_hypervisor_bit(index):
    t = cpuid.apply_template(supported(), "host", index, 4)
    l1 = leaf(t, 1)
    assert l1["ebx"] >> 24 == index
    assert (l1["ebx"] >> 16) & 0xFF == 4
    assert l1["ecx"] & (1 << 31)
    assert leaf(t, 0xB)["edx"] == index


def test_auto_follows_the_host(monkeypatch):
    monkeypatch.setattr(cpuid, "software_kvm", lambda: True)
    assert cpuid.resolve("auto") == "minimal"
    monkeypatch.setattr(cpuid, "software_kvm", lambda: False)
    assert cpuid.resolve("auto") == "host"


def test_unknown_template():
    with pytest.raises(cpuid.CpuidError, match="unknown CPU template"):
        cpuid.resolve("fancy")


def test_input_table_not_modified():
    s = supported()
    cpuid.apply_template(s, "minimal", 1, 2)
    assert leaf(s, 1)["ecx"] == ALL
