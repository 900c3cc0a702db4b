"""`make setup-emulation`: build, once, what running Python code on aarch64 cores under qemu user mode needs.

`python -m convnext_deploy.pipeline.device.emulation_setup` builds under `$CONVNEXT_DEPLOY_EMULATION` (default
~/.cache/convnext-deploy/emulation), in a folder named after the versions (aarch64-qemu10.0.2-py3.11-ort…-ov…):
- `qemu-aarch64`: Debian bookworm-backports' `qemu-user` (static binaries; bookworm's own 7.2 hands the guest the
  host's x86 /proc/cpuinfo and `import onnxruntime` segfaults);
- `root/`: Debian bookworm's arm64 Python 3.11 and the libraries it and the wheels load, unpacked with `dpkg -x`;
- `site/`: the aarch64 wheels of numpy, Pillow, ONNX Runtime, OpenVINO at constraints.txt's versions, with deps;
- `manifest.json`, written last, after the guest has imported all four: a folder without it is never used.
The packages come through a private apt configuration (its own sources, lists and architecture under
`downloads/`): the system's apt sources and dpkg architectures are left as they are, and no root is needed. The
.debs and the wheels stay in `downloads/`, so a rebuild downloads nothing. A finished build is found in well
under a second; a failure is one line naming the missing piece and the fix (exit 2).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from convnext_deploy.pipeline.core.errors import UserError, machine_error, machine_faults
from convnext_deploy.pipeline.device import emulator

MIRROR = "http://deb.debian.org/debian"
SECURITY = "http://deb.debian.org/debian-security"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
QEMU_SUITES = [(MIRROR, "bookworm-backports")]
ROOT_SUITES = [(MIRROR, "bookworm"), (MIRROR, "bookworm-updates"), (SECURITY, "bookworm-security")]
# Python 3.11 and what it, its extension modules and the wheels load (read from a guest's /proc/self/maps after
# importing numpy, PIL, onnxruntime, openvino, ssl, sqlite3, lzma, bz2, ctypes, uuid; the wheels bundle the rest)
ROOT_DEBS = ["python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6", "libgcc-s1",
             "libstdc++6", "zlib1g", "libexpat1", "libffi8", "libssl3", "libbz2-1.0", "liblzma5", "libsqlite3-0",
             "libuuid1"]
PLATFORMS = ["manylinux2014_aarch64", "manylinux_2_28_aarch64", "manylinux_2_35_aarch64"]  # openvino 2026: 2_35
NEED_BYTES = 900 << 20  # downloads (~150 MB) + the build (~330 MB) + qemu-user unpacked before trimming (~370 MB)
CHECK_CPU = "cortex-a72"
MODULES = {"pillow": "PIL"}  # a wheel whose module is not named after it
# imports every wheel in the guest, then prints the versions pip recorded for them
CHECK = ("import importlib, json, platform, sys; "
         "[importlib.import_module(m) for m in sys.argv[1:] if m]; print(json.dumps({'python': "
         "platform.python_version(), 'machine': platform.machine()}))")
OFFLINE_FIX = (f"check access to deb.debian.org, or set {emulator.ENV_DIR} to a folder holding a finished build "
               "(copied from a machine that ran `make setup-emulation`)")


def _sh(args: list, what: str, fix: str, cwd: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a setup step; its output, or a UserError naming the step, the tool's last error line and the fix."""
    try:
        done = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                              check=False)
    except FileNotFoundError:
        raise UserError(f"{what}: {args[0]} is not on this machine (the emulation is built from Debian packages "
                        f"with apt-get, dpkg and pip): {fix}") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"{what}: {Path(str(args[0])).name} took longer than {timeout:g} s: {fix}") from None
    if done.returncode:
        lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith(("E:", "ERROR", "error"))] or lines
        raise UserError(f"{what} ({Path(str(args[0])).name} exited {done.returncode}: "
                        f"{errors[-1][:300] if errors else 'no output'}): {fix}")
    return done


def _apt_options(arch: str, suites: list[tuple[str, str]], downloads: Path) -> list[str]:
    """apt options for a private configuration of `arch`: its own sources, lists and caches under downloads/."""
    state = downloads / f"apt-{arch}"
    for d in (state / "lists" / "partial", state / "cache" / "archives" / "partial"):
        d.mkdir(parents=True, exist_ok=True)
    sources = state / "sources.list"
    sources.write_text("".join(f"deb [arch={arch} signed-by={KEYRING}] {url} {suite} main\n" for url, suite in suites))
    opts = {"Dir::Etc::SourceList": sources, "Dir::Etc::SourceParts": "/dev/null", "Dir::Etc::Preferences": "/dev/null",
            "Dir::Etc::PreferencesParts": "/dev/null", "Dir::State": state, "Dir::State::Lists": state / "lists",
            "Dir::State::status": "/dev/null", "Dir::Cache": state / "cache", "APT::Architecture": arch,
            "APT::Architectures::": arch, "Debug::NoLocking": "1", "Acquire::Languages": "none",
            "Acquire::Retries": "2", "Acquire::http::Timeout": "30"}
    if os.geteuid() == 0:  # root: download as root, not as _apt (which cannot write into the cache)
        opts["APT::Sandbox::User"] = "root"
    return [x for k, v in opts.items() for x in ("-o", f"{k}={v}")]


def _fetch(arch: str, suites: list[tuple[str, str]], packages: list[str],
           downloads: Path) -> dict[str, tuple[str, Path]]:
    """Each package's newest version in `suites` for `arch`, downloaded into downloads/debs (kept): name → (version,
    .deb)."""
    where = f"{', '.join(s for _, s in suites)} ({arch})"
    if not KEYRING.is_file():
        raise UserError(f"{KEYRING} is missing: apt-get install debian-archive-keyring")
    opts = _apt_options(arch, suites, downloads)
    update = _sh(["apt-get", "-q", *opts, "update"], f"cannot read the package lists of {where}", OFFLINE_FIX)
    failed = [line for line in update.stderr.splitlines() if line.startswith(("W:", "E:")) and "fetch" in line]
    try:  # apt-get update only warns when it cannot reach a mirror: then nothing is found, for the reason it warned
        shown = _sh(["apt-cache", *opts, "show", "--no-all-versions", *packages],
                    f"cannot find {' '.join(packages)} in {where}", OFFLINE_FIX).stdout
    except UserError:
        if failed:
            raise UserError(f"cannot download the package lists of {where} ({failed[0][:300]}): "
                            f"{OFFLINE_FIX}") from None
        raise
    found = {}
    for stanza in shown.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line.startswith(" "))
        if fields.get("Package") in packages:
            name = f"{fields['Package']}_{fields['Version'].replace(':', '%3a')}_{fields['Architecture']}.deb"
            deb = downloads / "debs" / name
            found[fields["Package"]] = (fields["Version"], deb)
    missing = [p for p in packages if p not in found]
    if missing:
        raise UserError(f"{where} has no {', '.join(missing)}: {OFFLINE_FIX}")
    (downloads / "debs").mkdir(parents=True, exist_ok=True)
    wanted = [p for p, (_, deb) in found.items() if not deb.is_file()]
    if wanted:
        _sh(["apt-get", "-q", *opts, "download", *[f"{p}={found[p][0]}" for p in wanted]],
            f"cannot download {' '.join(wanted)} from {where}", OFFLINE_FIX, cwd=downloads / "debs")
    return found


def _unpack(deb: Path, into: Path) -> None:
    _sh(["dpkg", "-x", deb, into], f"cannot unpack {deb.name}",
        f"delete {deb} (a damaged download) and run `make setup-emulation` again")


def _qemu(build: Path, downloads: Path, log) -> dict:
    """qemu-aarch64 from bookworm-backports' qemu-user (static binaries) as build/qemu-aarch64; its versions."""
    version, deb = _fetch("amd64", QEMU_SUITES, ["qemu-user"], downloads)["qemu-user"]
    log(f"  qemu-user {version} (bookworm-backports, {deb.stat().st_size >> 20} MiB)")
    scratch = build / ".qemu-user"
    _unpack(deb, scratch)
    (scratch / "usr" / "bin" / "qemu-aarch64").rename(build / "qemu-aarch64")
    shutil.rmtree(scratch)
    line = _sh([build / "qemu-aarch64", "--version"], "qemu-aarch64 does not start", OFFLINE_FIX).stdout.splitlines()[0]
    number = emulator.qemu_number(line)
    if number < emulator.MIN_QEMU:
        raise UserError(f"bookworm-backports' qemu-aarch64 is {line!r}, older than 8.2 (which gives an aarch64 guest "
                        f"its own /proc/cpuinfo): {OFFLINE_FIX}")
    return {"qemu": ".".join(map(str, number)), "qemu_version": line,
            "qemu_from": f"Debian bookworm-backports qemu-user {version} (static)"}


def _root(build: Path, downloads: Path, log) -> dict[str, str]:
    """Debian's arm64 Python 3.11 and its libraries unpacked into build/root; the .debs' versions."""
    found = _fetch("arm64", ROOT_SUITES, ROOT_DEBS, downloads)
    log(f"  arm64 Python {found['python3.11-minimal'][0]} and {len(found) - 1} libraries (bookworm)")
    for _, deb in found.values():
        _unpack(deb, build / "root")
    for junk in ("doc", "man", "lintian", "locale"):
        shutil.rmtree(build / "root" / "usr" / "share" / junk, ignore_errors=True)
    return {p: v for p, (v, _) in sorted(found.items())}


def _wheels(build: Path, downloads: Path, want: dict[str, str], log) -> dict[str, str]:
    """The aarch64 wheels at the wanted versions (and what they need) into build/site; every installed version.
    The wheels are kept in downloads/wheels: a rebuild installs from there without the index when it can."""
    log("  wheels: " + ", ".join(f"{w} {v}" for w, v in want.items()) + " (aarch64, with their dependencies)")
    kept = downloads / "wheels"
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    target = ["--only-binary=:all:", "--python-version", emulator.PYTHON, "--implementation", "cp",
              *[x for p in PLATFORMS for x in ("--platform", p)], "-c", emulator.CONSTRAINTS,
              *[f"{w}=={v}" for w, v in want.items()]]
    install = [*pip, "install", "--no-warn-script-location", "--target", build / "site", "--no-index",
               "--find-links", kept, *target]
    try:
        _sh(install, "", "")
    except UserError:  # not all kept yet: download what is missing (pip skips the files it has), then install
        shutil.rmtree(build / "site", ignore_errors=True)
        fix = f"check access to PyPI (pip's index), or set {emulator.ENV_DIR} to a folder holding a finished build"
        _sh([*pip, "download", "--dest", kept, *target], "cannot download the aarch64 wheels", fix)
        _sh(install, "cannot install the aarch64 wheels", f"delete {kept} and run `make setup-emulation` again")
    installed = _installed(build / "site")
    return dict(sorted(installed.items()))


def _guest(build: Path) -> emulator.Emulation:
    """The Emulation of a build that has no manifest yet."""
    return emulator.Emulation("aarch64", build / "qemu-aarch64", build / "root", build / "site",
                              build / "root" / "usr" / "bin" / f"python{emulator.PYTHON}", {})


def _installed(site: Path) -> dict[str, str]:
    """The version pip recorded for every wheel in `site` (its *.dist-info folders)."""
    installed = {}
    for info in site.glob("*.dist-info"):
        name, _, version = info.name[: -len(".dist-info")].rpartition("-")
        installed[name.lower().replace("_", "-")] = version
    return installed


def _check(build: Path, want: dict[str, str]) -> dict:
    """Import every wheel in the guest (this also writes the stdlib's bytecode once); what it and pip report."""
    modules = [MODULES.get(w, w) for w in want]
    done = emulator.run(_guest(build), CHECK_CPU, ["-c", CHECK, *modules], timeout=600)
    fix = f"delete {build.parent / 'downloads'} and run `make setup-emulation` again"
    if done.returncode:
        last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        raise UserError(f"the emulated aarch64 Python cannot import {', '.join(modules)} ({last[:300]}): {fix}")
    got = {**json.loads(done.stdout.strip().splitlines()[-1]), **_installed(build / "site")}
    wrong = {w: got.get(w) for w, v in want.items() if got.get(w) != v}
    if wrong or got["machine"] != "aarch64":
        raise UserError(f"the emulated aarch64 Python imports {got}, not {want}: {fix}")
    return got


def build(base: Path, want: dict[str, str], log=print) -> emulator.Emulation:
    """Build under base/.build-<pid>, then rename to base/<build_name> once it imports the four; its Emulation."""
    start = time.monotonic()
    downloads = base / "downloads"
    for stale in base.glob(".build-*"):  # a build that was stopped (we hold the lock: nobody else builds)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = base / f".build-{os.getpid()}"
    tmp.mkdir()
    try:
        manifest = {"layout": emulator.LAYOUT, "arch": "aarch64", **_qemu(tmp, downloads, log)}
        debs = _root(tmp, downloads, log)
        wheels = _wheels(tmp, downloads, want, log)
        log(f"  checking: the guest imports {', '.join(MODULES.get(w, w) for w in want)} (-cpu {CHECK_CPU})")
        got = _check(tmp, want)
        manifest.update(python=got["python"], wheels=wheels, debs=debs, cpus=emulator.cpus(_guest(tmp)),
                        seconds=round(time.monotonic() - start, 1),
                        date=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        final = base / emulator.build_name(manifest["qemu"], want)
        if final.exists():  # an older build of the same name that no longer matches: out of the way first
            old = base / f".build-old-{os.getpid()}"
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return emulator.finished(base, want)


def ensure(log=print, rebuild: bool = False) -> tuple[emulator.Emulation, bool]:
    """The aarch64 emulation, built if there is no finished build of the wanted versions; (it, whether cached)."""
    want, base = emulator.wanted(), emulator.cache_dir()
    found = None if rebuild else emulator.finished(base, want)
    if found is not None:
        return found, True
    with machine_faults(base, need_bytes=NEED_BYTES):
        base.mkdir(parents=True, exist_ok=True)
        with open(base / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; a second waits and finds the first's
            found = None if rebuild else emulator.finished(base, want)
            if found is not None:
                return found, True
            log(f"building aarch64 emulation under {base} (once; a few minutes):")
            return build(base, want, log), False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="setup-emulation", description=__doc__.splitlines()[0])
    parser.add_argument("--rebuild", action="store_true", help="build again even if a finished build matches")
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        em, cached = ensure(rebuild=args.rebuild)
    except UserError as e:
        print(f"setup-emulation: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        err = machine_error(e)
        if err is None:
            raise
        print(f"setup-emulation: error: {err}", file=sys.stderr)
        return err.exit_code
    how = "cached" if cached else f"built in {time.monotonic() - start:.0f} s, qemu {em.manifest['qemu']}"
    print(f"aarch64 emulation ready: {em.root.parent} ({how})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
