"""Debian package fetching and unpacking for the corpus scripts (no system-wide install).

`fetch` runs `apt-get download` into a cache folder and skips packages already there; `unpack` extracts a .deb into
a folder with `dpkg-deb -x` when that tool exists, else with a pure-Python ar + tar reader (the GPU machine may lack
dpkg). Both fail with a message that names the package and the fix.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import tarfile
from pathlib import Path


class PackageError(RuntimeError):
    """A package could not be fetched or unpacked."""


def deb_for(name: str, debs_dir: Path) -> Path | None:
    """The cached .deb of package `name` in debs_dir, if any (file names are NAME_VERSION_ARCH.deb)."""
    found = sorted(debs_dir.glob(f"{name}_*.deb"))
    return found[-1] if found else None


def fetch(names: list[str], debs_dir: Path) -> dict[str, Path]:
    """Download each package's .deb into debs_dir unless it is already there; return name -> .deb path."""
    debs_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Path] = {}
    for name in names:
        deb = deb_for(name, debs_dir)
        if deb is None:
            deb = _download(name, debs_dir)
        result[name] = deb
    return result


def _download(name: str, debs_dir: Path) -> Path:
    if shutil.which("apt-get") is None:
        raise PackageError(f"package {name}: no {name}_*.deb in {debs_dir} and no apt-get here to download it; "
                           f"copy the .deb into {debs_dir}")
    proc = subprocess.run(["apt-get", "download", name], cwd=debs_dir, capture_output=True, text=True)
    deb = deb_for(name, debs_dir)
    if proc.returncode != 0 or deb is None:
        raise PackageError(f"package {name}: `apt-get download {name}` failed in {debs_dir} "
                           f"(run `apt-get update` first?): {proc.stderr.strip()[-400:]}")
    return deb


def unpack(deb: Path, dest: Path) -> Path:
    """Extract the data part of `deb` into dest (merged, like `dpkg-deb -x`); returns dest."""
    dest.mkdir(parents=True, exist_ok=True)
    if shutil.which("dpkg-deb"):
        proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise PackageError(f"{deb}: dpkg-deb -x failed: {proc.stderr.strip()[-400:]}")
        return dest
    _unpack_python(deb, dest)
    return dest


def _unpack_python(deb: Path, dest: Path) -> None:
    for member, payload in _ar_members(deb):
        if member.startswith("data.tar"):
            mode = {"xz": "r:xz", "gz": "r:gz", "bz2": "r:bz2", "tar": "r:"}.get(member.rsplit(".", 1)[-1])
            if mode is None:
                raise PackageError(f"{deb}: {member} is compressed in a way Python cannot read; install dpkg-deb")
            with tarfile.open(fileobj=io.BytesIO(payload), mode=mode) as tar:
                tar.extractall(dest, filter="tar")
            return
    raise PackageError(f"{deb}: no data.tar member; expected a Debian binary package")


def _ar_members(deb: Path) -> list[tuple[str, bytes]]:
    data = deb.read_bytes()
    if data[:8] != b"!<arch>\n":
        raise PackageError(f"{deb}: not an ar archive; expected a Debian .deb file")
    members = []
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        members.append((name, data[pos + 60:pos + 60 + size]))
        pos += 60 + size + (size & 1)
    return members


def fetch_and_unpack(names: list[str], debs_dir: Path, root: Path) -> dict[str, Path]:
    """Fetch each package and unpack it into root/<name> (skipped when that folder exists); name -> folder."""
    folders: dict[str, Path] = {}
    for name, deb in fetch(names, debs_dir).items():
        folder = root / name
        if not folder.is_dir():
            tmp = root / f".{name}.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            unpack(deb, tmp)
            tmp.rename(folder)
        folders[name] = folder
    return folders


def unpack_prefix(debs: list[Path], prefix: Path) -> Path:
    """Unpack several .debs into one prefix (for running programs from them: bin, lib, share)."""
    for deb in debs:
        unpack(deb, prefix)
    return prefix


# ----------------------------------------------------------------------------------------------------------------------
# Speech-enhancement sources (shared/DATA.md). Training speech is GPL game/stamp audio: used here, never committed.

SE_TRAIN_SPEECH_PACKAGES = ["fillets-ng-data-cs", "tuxpaint-stamps-default", "gcin-voice", "codec2-examples"]
SE_TRAIN_NOISE_PACKAGES = ["tuxpaint-stamps-default", "fillets-ng-data", "sonic-pi-samples"]
VAL_TUXPAINT_LANGS = ("el", "da")  # held-out speakers: these narrators never appear in training
# sonic-pi (CC0) noise-like samples, split by recording: training gets these, se_calib the SONIC_CALIB ones.
SONIC_TRAIN = (
    "ambi_sauna", "ambi_soft_buzz", "ambi_lunar_land", "ambi_haunted_hum", "ambi_dark_woosh", "ambi_glass_hum",
    "loop_electric", "loop_garzul", "loop_drone_g_97", "loop_weirdo", "vinyl_rewind", "vinyl_scratch",
    "vinyl_backspin", "misc_cineboom", "perc_swoosh", "perc_swash", "mehackit_phone1", "mehackit_phone2",
)
SONIC_CALIB = (
    "vinyl_hiss", "loop_3d_printer", "loop_industrial", "misc_crow", "perc_door", "ambi_glass_rub", "ambi_swoosh",
    "ambi_choir", "ambi_drone", "loop_compus", "loop_safari", "perc_till", "mehackit_phone3", "mehackit_phone4",
)
_LANG_SUFFIX = re.compile(r"_[a-z]{2}(_[A-Z]{2})?\.(ogg|wav)$")


def fillets_speech(root: Path) -> dict[str, list[Path]]:
    """Czech game dialogue grouped by character (file names <level>-<character>-<line>.ogg)."""
    groups: dict[str, list[Path]] = {}
    for path in sorted((root / "fillets-ng-data-cs").rglob("*.ogg")):
        parts = path.stem.split("-")
        groups.setdefault(parts[1] if len(parts) > 2 else "other", []).append(path)
    return groups


def tuxpaint_speech(root: Path) -> dict[str, list[Path]]:
    """Spoken stamp descriptions grouped by language (one narrator set per language)."""
    groups: dict[str, list[Path]] = {}
    for path in sorted((root / "tuxpaint-stamps-default").rglob("*_desc_*")):
        if path.suffix not in (".ogg", ".wav"):
            continue
        lang = path.name.split("_desc_")[1].split(".")[0]
        groups.setdefault(lang, []).append(path)
    return groups


def gcin_syllables(root: Path) -> dict[str, list[Path]]:
    """Isolated Mandarin syllables grouped by speaker (file name 3.ogg / 5.ogg)."""
    groups: dict[str, list[Path]] = {}
    for path in sorted((root / "gcin-voice").rglob("*.ogg")):
        groups.setdefault(path.stem, []).append(path)
    return groups


def codec2_speech(root: Path) -> list[Path]:
    """The wideband clean studio sentence (the other codec2 clips are 8 kHz or radio-noisy)."""
    return sorted((root / "codec2-examples").rglob("speech_orig_16k.wav"))


def tuxpaint_noise(root: Path) -> list[Path]:
    """Non-speech stamp sounds: no language suffix, not the spoken symbols."""
    found = []
    for path in sorted((root / "tuxpaint-stamps-default").rglob("*")):
        if path.suffix in (".ogg", ".wav") and "_desc" not in path.name and "symbols" not in path.parts:
            if not _LANG_SUFFIX.search(path.name):
                found.append(path)
    return found


def fillets_effects(root: Path) -> list[Path]:
    return sorted((root / "fillets-ng-data").rglob("sound/*/en/*.ogg"))


def sonic_samples(root: Path, names: tuple[str, ...]) -> list[Path]:
    folder = root / "sonic-pi-samples" / "usr/share/sonic-pi/samples"
    missing = [n for n in names if not (folder / f"{n}.flac").is_file()]
    if missing:
        raise PackageError(f"{folder}: expected sonic-pi samples {missing}")
    return [folder / f"{n}.flac" for n in names]
