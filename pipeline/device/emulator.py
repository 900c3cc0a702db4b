"""Running a command on a CPU this machine is not: qemu user mode, one named core, a Python of that architecture.

- aarch64: the build `make setup-emulation` leaves under `$CONVNEXT_DEPLOY_EMULATION` (default
  ~/.cache/convnext-deploy/emulation): qemu-aarch64 ≥ 8.2 (Debian bookworm-backports, static), Debian's arm64
  Python 3.11 and its libraries unpacked into `root/`, and the aarch64 wheels of numpy, Pillow, ONNX Runtime and
  OpenVINO at constraints.txt's versions in `site/`. `-cpu C` sets the guest's HWCAP and its /proc/cpuinfo
  (Features, CPU part), so the runtimes pick that core's kernels.
- x86_64: the system's `qemu-x86_64-static` (Debian's qemu-user-static, `make setup`) running this venv's own
  Python; qemu 7.2 hands the guest the host's /proc/cpuinfo.

qemu-user shares this machine's file system: the guest reads and writes host paths as they are. `-L ROOT` makes a
path that also exists under ROOT resolve there first (the loader, libraries, /usr/lib/python3.11), so a file the
guest should read must not live under a path that `root/` also has (/tmp, /work and the home directory are fine).
Speed under emulation means nothing; numerics and the kernel choice are what it is for. No toolchain is imported.
"""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from convnext_deploy.pipeline.core.errors import UserError

ENV_DIR = "CONVNEXT_DEPLOY_EMULATION"
ARCHES = ("aarch64", "x86_64")
PYTHON = "3.11"
MIN_QEMU = (8, 2)  # 7.2 hands an aarch64 guest the host's x86 /proc/cpuinfo, and `import onnxruntime` segfaults
# at constraints.txt's versions; onnx: `validate` reads the ONNX Runtime bundle's model metadata with it; tqdm: the
# data streaming's progress bar (device-check reads the evaluation images in the guest too)
WHEELS = ("numpy", "pillow", "onnx", "onnxruntime", "openvino", "tqdm")
LAYOUT = 1  # the build's layout; a build of another layout is not used
CONSTRAINTS = Path(__file__).resolve().parents[2] / "constraints.txt"
X86_QEMU = "qemu-x86_64-static"
SETUP = "run `make setup-emulation`"
# what the host's environment must not hand an aarch64 guest (qemu passes its own environment on)
HOST_ONLY = ("PYTHON", "VIRTUAL_ENV", "LD_PRELOAD", "LD_LIBRARY_PATH", "QEMU_", "CONDA_")


@dataclass(frozen=True)
class Emulation:
    """One architecture's emulation: the qemu binary, the guest's file-system root (-L), the Python it runs and the
    folder of its wheels (None: the Python's own site-packages, as for x86_64), and what the build recorded."""
    arch: str
    qemu: Path
    root: Path
    site: Path | None
    python: Path
    manifest: dict


def cache_dir() -> Path:
    """Where builds live: $CONVNEXT_DEPLOY_EMULATION, else ~/.cache/convnext-deploy/emulation."""
    raw = os.environ.get(ENV_DIR)
    return Path(raw).expanduser() if raw else Path.home() / ".cache" / "convnext-deploy" / "emulation"


def wanted() -> dict[str, str]:
    """The wheel versions an aarch64 build must have: constraints.txt's pins of numpy, pillow, onnxruntime, openvino."""
    try:
        text = CONSTRAINTS.read_text()
    except OSError as e:
        raise UserError(f"cannot read {CONSTRAINTS} ({e.strerror}): the emulation takes its wheel versions from the "
                        "checkout's constraints.txt; run from a checkout (pip install -e .)") from None
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.MULTILINE))
    missing = [w for w in WHEELS if w not in pins]
    if missing:
        raise UserError(f"{CONSTRAINTS} pins no version of {', '.join(missing)}: the emulation needs exact pins "
                        "(name==x.y.z)")
    return {w: pins[w] for w in WHEELS}


def qemu_number(text: str) -> tuple[int, ...]:
    """(10, 0, 2) from "qemu-aarch64 version 10.0.2 (Debian ...)" or "10.0.2"; () when none."""
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(g) for g in m.groups() if g is not None) if m else ()


def build_name(qemu: str, want: dict[str, str]) -> str:
    """The build's folder, named after the architecture and its versions."""
    return f"aarch64-qemu{qemu}-py{PYTHON}-ort{want['onnxruntime']}-ov{want['openvino']}"


def matches(manifest: dict, want: dict[str, str]) -> bool:
    """Whether a finished build has the layout, Python, qemu and wheel versions wanted."""
    return (manifest.get("layout") == LAYOUT and str(manifest.get("python", "")).startswith(PYTHON + ".")
            and qemu_number(str(manifest.get("qemu", ""))) >= MIN_QEMU
            and all(manifest.get("wheels", {}).get(w) == v for w, v in want.items()))


def finished(base: Path, want: dict[str, str]) -> Emulation | None:
    """The newest-qemu finished build under `base` matching `want`, or None. A folder without manifest.json (a
    build that did not finish) is never used."""
    found = []
    for d in base.glob("aarch64-*") if base.is_dir() else ():
        try:
            manifest = json.loads((d / "manifest.json").read_text())
        except (OSError, ValueError):
            continue
        root = d / "root"
        python = root / "usr" / "bin" / f"python{PYTHON}"
        em = Emulation("aarch64", d / "qemu-aarch64", root, d / "site", python, manifest)
        if matches(manifest, want) and em.qemu.is_file() and em.python.is_file():
            found.append((qemu_number(manifest["qemu"]), em))
    return max(found, key=lambda f: f[0])[1] if found else None


def find(arch: str) -> Emulation:
    """The emulation of `arch` ("aarch64" or "x86_64"); UserError naming what is missing and the fix."""
    if arch == "aarch64":
        want, base = wanted(), cache_dir()
        em = finished(base, want)
        if em is None:
            pins = ", ".join(f"{w} {v}" for w, v in want.items())
            raise UserError(f"aarch64 emulation is not set up in {base} (no finished build of qemu-aarch64 ≥ "
                            f"{'.'.join(map(str, MIN_QEMU))}, Python {PYTHON}, {pins}): {SETUP}, or set {ENV_DIR} "
                            "to the folder it built")
        return em
    if arch == "x86_64":
        for d in os.environ.get("PATH", os.defpath).split(os.pathsep):
            qemu = Path(d or ".") / X86_QEMU
            if qemu.is_file() and os.access(qemu, os.X_OK):
                return Emulation("x86_64", qemu, Path("/"), None, Path(sys.executable),
                                 {"arch": "x86_64", "source": "system", "python": platform.python_version()})
        raise UserError(f"{X86_QEMU} is not installed (Debian's qemu-user-static): run `make setup`, or "
                        "`apt-get install qemu-user-static`")
    raise UserError(f"no emulation of {arch!r}: one of {', '.join(ARCHES)}")


def command(em: Emulation, cpu: str, argv: list[str], env: dict | None = None) -> list[str]:
    """The full argv running the emulation's Python with `argv` on core `cpu` (a name of `qemu -cpu help`);
    `env` is set in the guest with -E. For aarch64 the guest also gets PYTHONPATH (the wheels, then env's own)
    and PYTHONNOUSERSITE; run it with `run` (or an environment without the host's PYTHON*/LD_* variables)."""
    guest = dict(env or {})
    if em.site is not None:
        own = [guest["PYTHONPATH"]] if guest.get("PYTHONPATH") else []
        guest["PYTHONPATH"] = os.pathsep.join([str(em.site), *own])
        guest.setdefault("PYTHONNOUSERSITE", "1")
    args = [str(em.qemu), "-cpu", cpu]
    if em.root != Path("/"):
        args += ["-L", str(em.root)]
    for key, value in guest.items():
        args += ["-E", f"{key}={value}"]
    return [*args, str(em.python), *argv]


def host_env(em: Emulation) -> dict[str, str]:
    """The environment qemu runs in: this process's, less what only the host's Python and loader understand when
    the guest is of another architecture (qemu hands its environment to the guest)."""
    if em.site is None:
        return dict(os.environ)
    return {k: v for k, v in os.environ.items() if not k.startswith(HOST_ONLY)}


def run(em: Emulation, cpu: str, argv: list[str], timeout: float, env: dict | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`command(...)` run to its end, output captured as text; UserError (one line) past `timeout` seconds."""
    cmd = command(em, cpu, argv, env)
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=host_env(em), cwd=cwd,
                              check=False)
    except subprocess.TimeoutExpired:
        shown = " ".join(argv)
        raise UserError(f"the emulated {cpu} run took longer than {timeout:g} s: {shown[:200]}") from None
    except OSError as e:
        raise UserError(f"cannot start {em.qemu} ({e.strerror}): {SETUP}") from None


def version(em: Emulation) -> str:
    """The qemu version, e.g. "10.0.2"."""
    out = subprocess.run([str(em.qemu), "--version"], capture_output=True, text=True, check=False).stdout
    return ".".join(map(str, qemu_number(out)))


def cpus(em: Emulation) -> list[str]:
    """The core names this qemu emulates (`-cpu help`)."""
    out = subprocess.run([str(em.qemu), "-cpu", "help"], capture_output=True, text=True, check=False).stdout
    names = []
    for line in out.splitlines()[1:]:
        words = line.split()
        if not words:  # x86 lists its CPUID flags after a blank line
            break
        names.append(words[1] if words[0] == "x86" and len(words) > 1 else words[0])
    return names
