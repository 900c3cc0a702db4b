"""The CPU profile on ARM, from recorded CPU descriptions: /proc/cpuinfo as an aarch64 Linux kernel prints it (no
"model name" line: the core is named by implementer and part; `Features`, not `flags`) and macOS's `sysctl` on
Apple silicon (no /proc/cpuinfo at all). Each names its real INT8 path (dot-product, I8MM or neither) and nothing
x86: the deploy matrix runs ONNX Runtime and OpenVINO on ARM Linux and ONNX Runtime on macOS arm64.

tests/data/cpuinfo/: AWS Graviton3 (Neoverse-V1, a c7g instance), Raspberry Pi 4 (Cortex-A72) and Raspberry Pi 5
(Cortex-A76, 64-bit Raspberry Pi OS: the Pi kernel adds the board's Revision and Model lines after the cores;
the Serial line is left out)."""
from pathlib import Path

import pytest

from convnext_deploy.pipeline.decisions import reasons
from convnext_deploy.pipeline.measure import machine
from convnext_deploy.reports.benchmarks import isa_text, short_isa

CPUINFO = Path(__file__).parent / "data" / "cpuinfo"
X86 = ("avx", "vnni", "amx", "vpmaddubsw", "vpdpbusd")

# `sysctl machdep.cpu.brand_string hw.optional.AdvSIMD hw.optional.arm.FEAT_DotProd hw.optional.arm.FEAT_I8MM
# hw.optional.arm.FEAT_BF16` (the command machine._sysctl runs): GitHub's macos-14 runner (an M1, virtualized)
# and an M2, which added I8MM and BF16.
SYSCTL_M1 = """machdep.cpu.brand_string: Apple M1 (Virtual)
hw.optional.AdvSIMD: 1
hw.optional.arm.FEAT_DotProd: 1
hw.optional.arm.FEAT_I8MM: 0
hw.optional.arm.FEAT_BF16: 0
"""
SYSCTL_M2 = """machdep.cpu.brand_string: Apple M2
hw.optional.AdvSIMD: 1
hw.optional.arm.FEAT_DotProd: 1
hw.optional.arm.FEAT_I8MM: 1
hw.optional.arm.FEAT_BF16: 1
"""

# recorded file → (name, INT8-relevant flags, INT8 path, BF16 path)
LINUX = {
    "arm-neoverse-v1-graviton3": ("ARM Neoverse-V1", ["asimd", "asimddp", "i8mm", "bf16"], "ARM I8MM (SMMLA)",
                                  "ARM BF16 (BFMMLA)"),
    "arm-cortex-a76-raspberry-pi-5": ("Raspberry Pi 5 Model B Rev 1.0 (ARM Cortex-A76)", ["asimd", "asimddp"],
                                      "ARM dot-product (SDOT/UDOT)", None),
    "arm-cortex-a72-raspberry-pi-4": ("Raspberry Pi 4 Model B Rev 1.4 (ARM Cortex-A72)", ["asimd"],
                                      "ARM NEON without dot-product (SMLAL/SADALP widening multiply-adds)", None),
}
EMULATED = "none: BF16 is emulated (converted to FP32), slower than FP32"


def no_x86(text: str) -> None:
    assert not [w for w in X86 if w in text.lower()], text


@pytest.mark.parametrize("name", LINUX)
def test_the_recordings_are_aarch64_kernel_text(name):
    """What the reader must cope with: no "model name", no "flags", the core named only by its part number."""
    text = (CPUINFO / f"{name}.txt").read_text()
    keys = {line.partition(":")[0].strip() for line in text.splitlines()}
    assert {"Features", "CPU implementer", "CPU part", "CPU architecture"} <= keys
    assert not keys & {"model name", "flags", "vendor_id"}


@pytest.mark.parametrize("name", LINUX)
def test_an_aarch64_cpuinfo_names_the_core_and_its_int8_path(name, monkeypatch):
    want_name, want_flags, int8, bf16 = LINUX[name]
    text = (CPUINFO / f"{name}.txt").read_text()
    model, flags = machine.cpuinfo_fields(text)
    assert model == want_name
    assert machine.cpu_flags(flags) == want_flags
    # this machine's profile reads the same file the same way (as on an aarch64 runner)
    monkeypatch.setattr(machine, "_cpuinfo", lambda: text)
    prof = machine.cpu_profile()
    assert machine.cpu_name() == want_name and machine.cpu_flags() == want_flags
    assert (prof["cpu"], prof["flags"], prof["int8_path"]) == (want_name, want_flags, int8)
    assert prof["bf16_path"] == (bf16 or EMULATED) and prof["bf16_native"] == (bf16 is not None)
    assert not prof["vnni"] and not prof["u8s8_saturates"]
    assert machine.cpu_identity(text) == {"vendor": None, "cpu_family": None, "cpu_model": None, "stepping": None,
                                          "generation": None}
    no_x86(machine.profile_line(prof))


def test_arm_features_beyond_the_int8_ones_are_not_listed():
    """Graviton3's SVE, SVE-I8MM and the crypto features are real but not what the INT8 path is chosen by."""
    _, flags = machine.cpuinfo_fields((CPUINFO / "arm-neoverse-v1-graviton3.txt").read_text())
    assert {"sve", "svei8mm", "svebf16", "sha3"} <= flags
    assert machine.cpu_profile(flags, "g3")["flags"] == ["asimd", "asimddp", "i8mm", "bf16"]


@pytest.mark.parametrize("text,name,int8,flags", [
    (SYSCTL_M1, "Apple M1 (Virtual)", "ARM dot-product (SDOT/UDOT)", ["asimd", "asimddp"]),
    (SYSCTL_M2, "Apple M2", "ARM I8MM (SMMLA)", ["asimd", "asimddp", "i8mm", "bf16"]),
])
def test_macos_on_apple_silicon_reads_sysctl(text, name, int8, flags, monkeypatch):
    """No /proc/cpuinfo on macOS: without sysctl the profile said "arm" and "no integer dot-product extension"."""
    assert machine.sysctl_fields(text) == (name, set(flags))
    monkeypatch.setattr(machine, "_cpuinfo", lambda: "")
    monkeypatch.setattr(machine, "_sysctl", lambda: text)
    prof = machine.cpu_profile()
    assert (prof["cpu"], prof["flags"], prof["int8_path"]) == (name, flags, int8)
    assert machine.cpu_name() == name
    no_x86(machine.profile_line(prof))


def test_an_older_macos_without_a_key_has_no_such_feature():
    """sysctl leaves an unknown key out of what it prints (and says so on stderr)."""
    text = "machdep.cpu.brand_string: Apple M1\nhw.optional.AdvSIMD: 1\n"
    assert machine.sysctl_fields(text) == ("Apple M1", {"asimd"})
    assert machine.cpu_profile(machine.sysctl_fields(text)[1], "Apple M1")["int8_path"].startswith("ARM NEON")


def test_sysctl_is_asked_on_macos_only(monkeypatch):
    monkeypatch.setattr(machine.sys, "platform", "linux")
    assert machine._sysctl() == ""


@pytest.mark.parametrize("name,says", [
    ("arm-neoverse-v1-graviton3", ["I8MM (SMMLA)", "float ops"]),
    ("arm-cortex-a76-raspberry-pi-5", ["SDOT/UDOT", "a core with I8MM"]),
    ("arm-cortex-a72-raspberry-pi-4", ["no ARM dot-product", "a core with SDOT"]),
])
def test_what_the_reports_say_of_an_arm_cpu(name, says):
    """The consumers of the profile: a speed miss's reason and the benchmark document's ISA cells name ARM paths."""
    model, flags = machine.cpuinfo_fields((CPUINFO / f"{name}.txt").read_text())
    prof = machine.cpu_profile(flags, model)
    note = reasons.int8_path_note(prof)
    for s in says:
        assert s in note, (s, note)
    no_x86(note)
    isa = isa_text(prof)
    assert isa.startswith(", ".join(["NEON", "NEON dot-product", "I8MM", "ARM BF16"][:len(prof["flags"])]))
    assert short_isa(prof).startswith("NEON, ")
    no_x86(isa)
    no_x86(short_isa(prof))
    assert ("dot-product yes" in isa) == ("asimddp" in prof["flags"])
    assert ("I8MM yes" in isa) == ("i8mm" in prof["flags"])
