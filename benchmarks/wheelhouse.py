"""The wheelhouse of the GPU check: every wheel a stock PyTorch GPU image (CPython 3.12, no network)
lacks to run ``benchmarks/gpu_check.py``, made beforehand on a machine with network access.

    python benchmarks/wheelhouse.py build [--out dist/wheelhouse]   # `make wheelhouse`
    python benchmarks/wheelhouse.py check [--out dist/wheelhouse]   # size, one version each, tags

``build`` empties OUT, builds the project's wheel (``python -m build --wheel``), downloads the wheels
listed in ``benchmarks/gpu_check_wheels.txt`` for CPython 3.12 on manylinux x86_64 (glibc <= 2.28)
with ``pip download --no-deps --only-binary=:all:``, builds the ``build:`` entries (sdist only on
PyPI) as pure-Python wheels with ``pip wheel --no-deps --no-build-isolation`` (``DS_BUILD_OPS=0``),
then runs ``check``. ``check`` prints one row per wheel and the total, and fails (exit 1) when the
total is over 64 MiB, a package has more than one wheel, a listed package or version is missing, a
wheel is not listed, or a wheel cannot install on CPython 3.12 / manylinux x86_64.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEEL_LIST = REPO / "benchmarks" / "gpu_check_wheels.txt"
DEFAULT_OUT = REPO / "dist" / "wheelhouse"
MAX_BYTES = 64 * 2**20
PROJECT = "scldm-scale"
PYTHON_VERSION = "3.12"
MAX_GLIBC = (2, 28)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_26_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
_LEGACY_GLIBC = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


def normalize(name: str) -> str:
    """PEP 503 project name: lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Pin:
    name: str  # as written in the list
    version: str
    build: bool  # sdist only on PyPI: built here

    @property
    def key(self) -> str:
        return normalize(self.name)


def read_pins(path: Path = WHEEL_LIST) -> list[Pin]:
    """The ``name==version`` lines of the wheel list (``build:`` prefix: built from the sdist)."""
    pins: list[Pin] = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        build = line.startswith("build:")
        spec = line.removeprefix("build:").strip()
        name, sep, version = spec.partition("==")
        if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name.strip()) or not version.strip():
            raise ValueError(f"{path}:{number}: expected name==version (or build: name==version), got {raw!r}")
        pins.append(Pin(name.strip(), version.strip(), build))
    seen: dict[str, Pin] = {}
    for pin in pins:
        if pin.key in seen:
            raise ValueError(f"{path}: {pin.name} is listed twice ({seen[pin.key].version} and {pin.version}); keep one")
        seen[pin.key] = pin
    return pins


@dataclass(frozen=True)
class Wheel:
    path: Path
    name: str  # normalized
    version: str
    python_tags: tuple[str, ...]
    abi_tags: tuple[str, ...]
    platform_tags: tuple[str, ...]

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    @property
    def tag(self) -> str:
        return "-".join(".".join(t) for t in (self.python_tags, self.abi_tags, self.platform_tags))


def parse_wheel(path: Path) -> Wheel:
    """``name-version[-build]-python-abi-platform.whl`` (PEP 427; compressed tag sets split on ``.``)."""
    parts = path.name[: -len(".whl")].split("-")
    if len(parts) not in (5, 6):
        raise ValueError(f"{path.name}: not a wheel file name (name-version[-build]-python-abi-platform.whl)")
    python, abi, platform = parts[-3:]
    return Wheel(path, normalize(parts[0]), parts[1], tuple(python.split(".")), tuple(abi.split(".")),
                 tuple(platform.split(".")))


def _glibc(platform_tag: str) -> tuple[int, int] | None:
    """(major, minor) glibc of a manylinux x86_64 tag, None for any other platform."""
    match = re.fullmatch(r"manylinux_(\d+)_(\d+)_x86_64", platform_tag)
    if match:
        return int(match.group(1)), int(match.group(2))
    legacy = re.fullmatch(r"(manylinux1|manylinux2010|manylinux2014)_x86_64", platform_tag)
    return _LEGACY_GLIBC[legacy.group(1)] if legacy else None


def installable(wheel: Wheel, python: str = PYTHON_VERSION, max_glibc: tuple[int, int] = MAX_GLIBC) -> bool:
    """Whether pip installs ``wheel`` on CPython ``python`` (e.g. "3.12") on manylinux x86_64 with glibc
    ``max_glibc`` (any of its compressed tag combinations)."""
    major, minor = (int(x) for x in python.split("."))
    cp = f"cp{major}{minor}"

    def py_ok(tag: str, abi: str) -> bool:
        if tag in ("py3", f"py{major}{minor}") or tag == cp:
            return abi in ("none", cp, "abi3") if tag == cp else abi == "none"
        match = re.fullmatch(r"cp(\d)(\d+)", tag)  # stable ABI of an older CPython 3
        return abi == "abi3" and bool(match) and int(match.group(1)) == major and int(match.group(2)) <= minor

    def platform_ok(tag: str) -> bool:
        glibc = _glibc(tag)
        return tag == "any" or (glibc is not None and glibc <= max_glibc)

    return any(py_ok(t, a) for t in wheel.python_tags for a in wheel.abi_tags) and \
        any(platform_ok(p) for p in wheel.platform_tags)


def check_wheelhouse(folder: Path, pins: list[Pin], project: str = PROJECT,
                     max_bytes: int = MAX_BYTES) -> tuple[list[Wheel], list[str]]:
    """The wheels of ``folder`` and what is wrong with them (an empty list: nothing).

    Exactly one wheel per package; every pin present at its version, plus one wheel of ``project``;
    nothing else; every wheel installable on CPython 3.12 / manylinux x86_64; at most ``max_bytes``.
    """
    errors: list[str] = []
    wheels: list[Wheel] = []
    for path in sorted(folder.glob("*.whl")):
        try:
            wheels.append(parse_wheel(path))
        except ValueError as err:
            errors.append(str(err))
    others = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix != ".whl") if folder.is_dir() else []
    if others:
        errors.append(f"{folder}: files that are not wheels: {', '.join(others)}")
    by_name: dict[str, list[Wheel]] = {}
    for wheel in wheels:
        by_name.setdefault(wheel.name, []).append(wheel)
    for name, group in sorted(by_name.items()):
        if len(group) > 1:
            errors.append(f"{name}: {len(group)} wheels ({', '.join(w.path.name for w in group)}); keep one version")
    expected = {pin.key: pin for pin in pins}
    for key, pin in sorted(expected.items()):
        found = by_name.get(key, [])
        if not found:
            errors.append(f"{pin.name}=={pin.version}: missing")
        elif all(w.version != pin.version for w in found):
            errors.append(f"{pin.name}: listed at {pin.version}, found {', '.join(w.version for w in found)}")
    if normalize(project) not in by_name:
        errors.append(f"{project}: the project's wheel is missing (python -m build --wheel)")
    unlisted = sorted(set(by_name) - set(expected) - {normalize(project)})
    if unlisted:
        errors.append(f"not in {WHEEL_LIST.name}: {', '.join(unlisted)}")
    for wheel in wheels:
        if not installable(wheel):
            errors.append(f"{wheel.path.name}: does not install on CPython {PYTHON_VERSION} manylinux x86_64 "
                          f"(glibc <= {MAX_GLIBC[0]}.{MAX_GLIBC[1]})")
    total = sum(w.size for w in wheels)
    if total > max_bytes:
        errors.append(f"total {total / 2**20:.1f} MiB is over the limit of {max_bytes / 2**20:.0f} MiB")
    return wheels, errors


def print_wheels(wheels: list[Wheel], max_bytes: int = MAX_BYTES) -> None:
    width = max([len(w.name) for w in wheels] + [7])
    for wheel in sorted(wheels, key=lambda w: -w.size):
        print(f"  {wheel.name:<{width}} {wheel.version:<14} {wheel.size / 2**10:>9,.0f} KiB  {wheel.tag}")
    total = sum(w.size for w in wheels)
    print(f"  {len(wheels)} wheels, {total / 2**20:.1f} MiB ({total:,} bytes; limit {max_bytes / 2**20:.0f} MiB)")


def check(folder: Path, pins: list[Pin]) -> int:
    if not folder.is_dir():
        print(f"error: {folder}: no wheelhouse; run `make wheelhouse` first", file=sys.stderr)
        return 2
    wheels, errors = check_wheelhouse(folder, pins)
    print(f"{folder}:")
    print_wheels(wheels)
    for err in errors:
        print(f"error: {err}", file=sys.stderr)
    return 1 if errors else 0


def _run(cmd: list[str], env: dict[str, str] | None = None, quiet: bool = False) -> None:
    """Run ``cmd``; with ``quiet`` its output is shown only when it fails."""
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=quiet, text=True)
    if proc.returncode != 0:
        if quiet:
            print(proc.stdout[-8000:] + proc.stderr[-8000:], file=sys.stderr)
        raise SystemExit(f"error: failed (exit {proc.returncode}): {' '.join(cmd)}")


def build(folder: Path, pins: list[Pin]) -> int:
    """Empty ``folder`` of its wheels and fill it: the project's wheel, the listed wheels, the built sdists."""
    folder.mkdir(parents=True, exist_ok=True)
    others = sorted(p.name for p in folder.iterdir() if p.suffix != ".whl")
    if others:
        print(f"error: {folder}: holds files other than wheels ({', '.join(others[:5])}); choose an empty folder",
              file=sys.stderr)
        return 2
    for old in folder.glob("*.whl"):
        old.unlink()
    _run([sys.executable, "-m", "build", "--wheel", "--outdir", str(folder), str(REPO)], quiet=True)
    shutil.rmtree(REPO / "build", ignore_errors=True)  # setuptools' staging folder
    download = [f"{p.name}=={p.version}" for p in pins if not p.build]
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
          "--python-version", PYTHON_VERSION, "--implementation", "cp", *platforms, "--dest", str(folder), *download])
    env = {**os.environ, "DS_BUILD_OPS": "0"}
    for pin in (p for p in pins if p.build):
        _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-cache-dir",
              "--no-binary", pin.name, "--wheel-dir", str(folder), f"{pin.name}=={pin.version}"], env=env)
    return check(folder, pins)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="examples:\n  python benchmarks/wheelhouse.py build\n"
                                            "  python benchmarks/wheelhouse.py check --out dist/wheelhouse")
    parser.add_argument("command", choices=["build", "check"],
                        help="build: make the wheelhouse (needs network); check: size, versions, tags")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="wheelhouse folder (e.g. --out dist/wheelhouse)")
    args = parser.parse_args(argv)
    pins = read_pins()
    folder = Path(args.out).resolve()
    return build(folder, pins) if args.command == "build" else check(folder, pins)


if __name__ == "__main__":
    sys.exit(main())
