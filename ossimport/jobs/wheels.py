"""The wheels a worker host installs ossimport from (`console deploy`): the ossimport wheel and every
dependency, built or downloaded on the deploying machine, so that a host needs no internet access and
nothing but `python3 -m venv`.

Cache: `<workingDir>/wheels/<target>/` (e.g. `cp311-linux_x86_64-glibc2.36`) keeps every wheel built or
downloaded, so a later deploy reuses them and, once they are there, works offline (pip is asked
without the index first). Delete the directory to pick up newer dependency versions. The ossimport
wheel is rebuilt from this source tree on every deploy. A file enters the cache by a rename, so a
killed deploy never leaves a truncated wheel there.

A host whose Python and platform are this machine's gets what `pip wheel` resolves here. Another
host (say Python 3.12 while this machine runs 3.11) gets the same versions: pure-Python wheels as
built here, binary ones downloaded for its tags, and a package with no binary wheel for it as its
source, built on the host with the setuptools and wheel shipped alongside.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ossimport.errors import OssimportError

# Needed to build the ossimport wheel (pyproject's build-system) and, on a host, any source package;
# kept in the cache so that a build needs no index once they are there.
BUILD_REQUIRES = ("setuptools>=61", "wheel")
SOURCE_FILES = ("pyproject.toml", "README.md", "ossimport")

# Run by the host's `python3 -c`: what it is, and whether it can make a venv (Debian's python3
# lacks ensurepip without python3-venv). No f-strings: an old python3 must still answer.
PROBE = """\
import json, platform, sys, sysconfig
try:
    import ensurepip, venv
    has_venv = True
except ImportError:
    has_venv = False
print(json.dumps({"python": list(sys.version_info[:2]), "implementation": sys.implementation.name,
                  "platform": sysconfig.get_platform(), "libc": " ".join(platform.libc_ver()).strip(),
                  "venv": has_venv}))
"""


class WheelError(OssimportError):
    code = "WheelError"


@dataclass(frozen=True)
class Target:
    """A Python to install for: `python` (3, 11), `implementation` cpython, `platform` as
    sysconfig names it (linux-x86_64), `libc` as platform.libc_ver() does (glibc 2.36)."""

    python: tuple[int, int]
    implementation: str
    platform: str
    libc: str

    @classmethod
    def from_probe(cls, output: str) -> tuple[Target, bool]:
        """The target and whether it can make a venv, from PROBE's output."""
        d = json.loads(output)
        return cls((int(d["python"][0]), int(d["python"][1])), str(d["implementation"]), str(d["platform"]),
                   str(d["libc"])), bool(d["venv"])

    @classmethod
    def here(cls) -> Target:
        out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
        return cls.from_probe(out)[0]

    @property
    def abi(self) -> str:
        prefix = {"cpython": "cp", "pypy": "pp"}.get(self.implementation, self.implementation)
        return f"{prefix}{self.python[0]}{self.python[1]}"

    @property
    def key(self) -> str:
        return f"{self.abi}-{self.platform.replace('-', '_').replace('.', '_')}-{self.libc.replace(' ', '')}"

    def platform_tags(self) -> list[str]:
        """The wheel platform tags such a host accepts, as pip computes them for itself."""
        system, _, arch = self.platform.partition("-")
        name, _, version = self.libc.partition(" ")
        if system != "linux" or name != "glibc":
            raise WheelError(f"cannot pick binary wheels for a {self.platform} host ({self.libc or 'no glibc'}) "
                             "from this machine: deploy from a machine of the host's platform and Python")
        major, minor = (int(x) for x in version.split(".")[:2])
        tags = [f"manylinux_{major}_{m}_{arch}" for m in range(minor, 4, -1)]
        legacy = {(2, 17): "manylinux2014", (2, 12): "manylinux2010", (2, 5): "manylinux1"}
        tags += [f"{alias}_{arch}" for (ma, mi), alias in legacy.items() if (major, minor) >= (ma, mi)]
        return [*tags, f"linux_{arch}"]


SOURCE_ROOT = Path(__file__).resolve().parents[2]


def wheels_for(cache_root: Path, target: Target, root: Path = SOURCE_ROOT) -> list[Path]:
    """Every file (wheels, and sources where a host has no wheel) that `pip install --no-index
    --find-links` needs to install ossimport (from the source tree `root`) on `target`; all in the
    cache under `cache_root`. Remembered per source tree and target: a deploy of unchanged code
    runs no pip at all."""
    if not (root / "pyproject.toml").exists():
        raise WheelError(f"deploy builds the ossimport wheel from its source tree, and {root} is not one: "
                         "run console.sh from a checkout or unpacked release of ossimport")
    _sweep(cache_root)
    digest = _source_digest(root)
    here = Target.here()
    for t in {here, target}:
        (cache_root / t.key).mkdir(parents=True, exist_ok=True)
    remembered = _recall(cache_root, target, digest)
    if remembered is not None:
        return remembered
    files = _recall(cache_root, here, digest)
    if files is None:
        files = _build_here(root, cache_root / here.key, digest)
        _remember(cache_root, here, digest, files)
    if target != here:
        try:
            files = _fetch_for(cache_root / target.key, cache_root / here.key, files, target)
        except WheelError as exc:
            raise WheelError(f"wheels for the host's Python {target.python[0]}.{target.python[1]} on "
                             f"{target.platform} ({target.libc}): {exc}") from None
        _remember(cache_root, target, digest, files)
    return files


def _sweep(cache_root: Path) -> None:
    """Build directories a killed deploy left (an hour old: a running deploy's are younger)."""
    cutoff = time.time() - 3600
    for tmp in [*cache_root.glob(".build-*"), *cache_root.glob(".fetch-*")]:
        if tmp.stat().st_mtime < cutoff:
            shutil.rmtree(tmp, ignore_errors=True)


def _source_digest(root: Path) -> str:
    h = hashlib.sha256()
    for name in SOURCE_FILES:
        top = root / name
        paths = sorted(p for p in top.rglob("*") if p.is_file() and "__pycache__" not in p.parts) \
            if top.is_dir() else [top]
        for path in paths:
            h.update(f"{path.relative_to(root)}\0".encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _manifest(cache_root: Path, target: Target, digest: str) -> Path:
    return cache_root / target.key / f"files-{digest}.json"


def _recall(cache_root: Path, target: Target, digest: str) -> list[Path] | None:
    try:
        files = [cache_root / rel for rel in json.loads(_manifest(cache_root, target, digest).read_text())]
    except (FileNotFoundError, ValueError):
        return None
    return files if all(f.exists() for f in files) else None


def _remember(cache_root: Path, target: Target, digest: str, files: list[Path]) -> None:
    path = _manifest(cache_root, target, digest)
    for old in path.parent.glob("files-*.json"):  # of older source trees
        old.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps([f.relative_to(cache_root).as_posix() for f in files]))
    os.replace(tmp, path)  # last, so a manifest names only files that are complete


def _build_here(root: Path, cache: Path, digest: str) -> list[Path]:
    """`pip wheel` of this source tree and its dependencies for this machine. The ossimport wheel
    goes to `ossimport-<digest>/` (its file name does not change with the code)."""
    with tempfile.TemporaryDirectory(dir=cache.parent, prefix=".build-") as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        for name in SOURCE_FILES:  # a copy: building in the tree would leave build/ and *.egg-info there
            if (root / name).is_dir():
                shutil.copytree(root / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                src.mkdir(exist_ok=True)
                shutil.copy2(root / name, src / name)
        _pip(["wheel", "--wheel-dir", str(out), "--find-links", str(cache), str(src), *BUILD_REQUIRES], out)
        project = cache / f"ossimport-{digest}"
        for old in cache.glob("ossimport-*/"):  # wheels of older source trees
            shutil.rmtree(old, ignore_errors=True)
        project.mkdir()
        own = [project / n for n in _move_into(out, project, "ossimport-*.whl")]
        return own + [cache / n for n in _move_into(out, cache)]


def _fetch_for(cache: Path, here_cache: Path, here: list[Path], target: Target) -> list[Path]:
    """The files for another Python or platform: the same versions as `here` (resolved here).
    `here_cache` holds setuptools and wheel: pip reads a source package's metadata with them."""
    files: list[Path] = []
    binary: list[str] = []
    source: list[str] = []
    for path in here:
        dist, version, *_, abi, plat = path.name[:-len(".whl")].split("-")
        if abi == "none" and plat == "any":  # pure Python: the wheel built here fits any host
            files.append(path)
        elif plat.startswith("linux_"):  # built here from its source (an index holds no such wheel)
            source.append(f"{dist}=={version}")
        else:
            binary.append(f"{dist}=={version}")
    binary_options = [
        "--only-binary=:all:", "--implementation", target.abi[:2], "--python-version",
        f"{target.python[0]}.{target.python[1]}", "--abi", target.abi, "--abi", "abi3", "--abi", "none",
        *(arg for tag in target.platform_tags() for arg in ("--platform", tag))]
    try:
        files += _download(cache, here_cache, binary, binary_options)
    except WheelError:  # one has no wheel for the host: find which, and send its source instead
        for req in binary:
            try:
                files += _download(cache, here_cache, [req], binary_options)
            except WheelError:
                source.append(req)
    # sources are built on the host, with the setuptools and wheel among the pure wheels above
    # (not --no-binary=:all:, which would refuse those wheels to the build of the metadata too)
    files += _download(cache, here_cache, source, [f"--no-binary={','.join(r.split('==')[0] for r in source)}"])
    return files


def _download(cache: Path, here_cache: Path, reqs: list[str], options: list[str]) -> list[Path]:
    if not reqs:
        return []
    with tempfile.TemporaryDirectory(dir=cache.parent, prefix=".fetch-") as tmp:
        out = Path(tmp) / "out"
        _pip(["download", "--no-deps", "--dest", str(out), "--find-links", str(cache), "--find-links",
              str(here_cache), *options, *reqs], out)
        return [cache / n for n in _move_into(out, cache)]


def _pip(args: list[str], out: Path) -> None:
    """pip from the cache alone first (offline, and the same versions as last time), then with the index."""
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args]
    if subprocess.run([*cmd, "--no-index"], capture_output=True, text=True).returncode == 0:
        return
    shutil.rmtree(out, ignore_errors=True)  # what the offline attempt left: resolved anew below
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [line.strip() for line in proc.stderr.splitlines() if line.strip().lower().startswith("error")]
        last = (errors or proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise WheelError(f"pip {args[0]} failed: {last}")


def _move_into(out: Path, cache: Path, pattern: str = "*") -> list[str]:
    names = sorted(p.name for p in out.glob(pattern) if p.is_file())
    for name in names:
        os.replace(out / name, cache / name)
    return names
