"""The voices of the synthetic corpus and the random per-utterance parameters (rate, pitch, augmentation).

A voice is a speaker id in utt2spk. Some voices are held out: they speak only the test_unseen_voice split, so
that split measures generalisation to speakers never heard in train/dev. Held-out voices come from every engine
that has more than one voice:
- espeak-ng: a voice is accent x variant. Two accents (Caribbean, West Midlands) and three variants are held out;
  held-out voices combine a held-out accent with a held-out variant, so neither was heard in training. Variants
  that are whispered, croaky or robotic are left out as hard to understand.
- flite: kal (8 kHz, band-limited), kal16, slt, awb train; rms is held out.
- festival: kal diphone and the slt HTS voice train; ked diphone is held out.
- hibari (neural, PyPI hibari-tts): its single packaged voice trains.
Audio of every engine is resampled to 16 kHz, so kal's 8 kHz output becomes telephone-band 16 kHz audio.
"""
import importlib.util
import random
import shutil
from dataclasses import dataclass
from typing import Dict, List, Sequence

ENGINES = ("espeak", "flite", "festival", "hibari")
DEBIAN_ENGINES = ("espeak", "flite", "festival")
# Executables run per engine; make_corpus reads this at call time and hands it to the workers (tests patch it).
ENGINE_BINARIES: Dict[str, str] = {"espeak": "espeak-ng", "flite": "flite", "festival": "festival"}
# Share of the seen-voice utterances per engine (renormalised over the engines asked for): the fast formant and
# diphone engines dominate; the slow HTS and neural voices add natural-sounding speech.
ENGINE_SHARE = {"espeak": 0.4, "flite": 0.3, "festival": 0.18, "hibari": 0.12}

ESPEAK_ACCENTS = {"us": "en-us", "gb": "en", "scot": "en-gb-scotland", "rp": "en-gb-x-rp",
                  "lanc": "en-gb-x-gbclan", "nyc": "en-us-nyc"}
ESPEAK_HELD_OUT_ACCENTS = {"carib": "en-029", "wmid": "en-gb-x-gbcwmd"}
ESPEAK_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f5", "klatt", "klatt2",
                   "Alex", "Andy", "Annie", "Lee", "Michael", "anika", "ed", "linda", "max", "paul", "steph")
ESPEAK_HELD_OUT_VARIANTS = ("f4", "klatt3", "edward")
FLITE_VOICES = ("kal", "kal16", "slt", "awb")
FLITE_HELD_OUT = ("rms",)
FESTIVAL_VOICES = {"kal": "kal_diphone", "slthts": "cmu_us_slt_arctic_hts"}
FESTIVAL_HELD_OUT = {"ked": "ked_diphone"}
HIBARI_VOICES = ("heart",)

# Per-utterance randomisation.
RATE_RANGE = (0.85, 1.2)  # speaking-rate factor, 1 = the engine's default
ESPEAK_WPM = 165  # espeak-ng's -s at rate 1
ESPEAK_PITCH_RANGE = (25, 75)  # espeak-ng -p (0-99, default 50)
PITCH_CENTS_RANGE = (-200, 200)  # sox pitch shift for the engines without a pitch option
PEAK_DB_RANGE = (-12.0, -1.0)  # output peak level: loudness varies like real recordings
AUGMENT_FRACTION = 0.35
REVERB_PROB, NOISE_PROB, TEMPO_PROB = 0.5, 0.6, 0.3  # effects of an augmented utterance (at least one)
REVERB_RANGE = (15, 70)  # sox reverb reverberance, %
ROOM_SCALE_RANGE = (20, 100)  # sox reverb room-scale, %
SNR_DB_RANGE = (8.0, 25.0)
NOISE_COLOURS = ("white", "pink", "brown")
TEMPO_RANGE = (0.9, 1.1)  # like Kaldi speed perturbation, without the pitch change


@dataclass(frozen=True)
class Voice:
    engine: str
    name: str  # what the engine is told: espeak "en-us+m3", flite "slt", festival "kal_diphone", hibari "heart"
    voice_id: str  # the speaker id: engine_voice, no hyphens (a hyphen separates voice and sentence in utt ids)
    held_out: bool


def all_voices() -> List[Voice]:
    voices = [Voice("espeak", f"{acc}+{var}", f"espeak_{a}_{var}", False)
              for a, acc in ESPEAK_ACCENTS.items() for var in ESPEAK_VARIANTS]
    voices += [Voice("espeak", f"{acc}+{var}", f"espeak_{a}_{var}", True)
               for a, acc in ESPEAK_HELD_OUT_ACCENTS.items() for var in ESPEAK_HELD_OUT_VARIANTS]
    voices += [Voice("flite", v, f"flite_{v}", False) for v in FLITE_VOICES]
    voices += [Voice("flite", v, f"flite_{v}", True) for v in FLITE_HELD_OUT]
    voices += [Voice("festival", v, f"festival_{k}", False) for k, v in FESTIVAL_VOICES.items()]
    voices += [Voice("festival", v, f"festival_{k}", True) for k, v in FESTIVAL_HELD_OUT.items()]
    voices += [Voice("hibari", v, f"hibari_{v}", False) for v in HIBARI_VOICES]
    return voices


def default_engines() -> List[str]:
    """The engines used when none are asked for: the Debian ones always, so the corpus does not depend on what a
    machine happens to have (a missing one's utterances fail and are counted), and hibari where it is installed
    (the optional `demo` extra)."""
    return list(DEBIAN_ENGINES) + (["hibari"] if importlib.util.find_spec("hibari") is not None else [])


def missing_engines(engines: Sequence[str]) -> List[str]:
    """The engines of `engines` that cannot run here: binary not on PATH, or hibari not importable."""
    def installed(engine: str) -> bool:
        if engine in ENGINE_BINARIES:
            return shutil.which(ENGINE_BINARIES[engine]) is not None
        return importlib.util.find_spec(engine) is not None

    return [e for e in engines if not installed(e)]


def check_engines(engines: Sequence[str]) -> List[str]:
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown or not engines:
        raise ValueError(f"unknown engine(s) {unknown or engines!r}: choose from {', '.join(ENGINES)}")
    return [e for e in ENGINES if e in engines]


class VoicePicker:
    """Draws voices: seen ones by engine share, then uniformly within the engine; held-out ones per engine."""

    def __init__(self, engines: Sequence[str]):
        voices = [v for v in all_voices() if v.engine in engines]
        self.seen = {e: [v for v in voices if v.engine == e and not v.held_out] for e in engines}
        self.seen = {e: vs for e, vs in self.seen.items() if vs}
        self.held_out = {e: [v for v in voices if v.engine == e and v.held_out] for e in engines}
        self.held_out = {e: vs for e, vs in self.held_out.items() if vs}
        if not self.seen or not self.held_out:
            raise ValueError(f"engines {list(engines)} lack seen or held-out voices: add espeak, flite or festival")

    def seen_voice(self, rng: random.Random) -> Voice:
        engine = rng.choices(list(self.seen), weights=[ENGINE_SHARE[e] for e in self.seen])[0]
        return rng.choice(self.seen[engine])

    def held_out_voice(self, rng: random.Random) -> Voice:
        return rng.choice(self.held_out[rng.choice(sorted(self.held_out))])


def draw_params(voice: Voice, rng: random.Random) -> dict:
    """Rate, pitch, level and augmentation of one utterance: JSON-able, recorded in utterances.jsonl."""
    params = {"rate": round(rng.uniform(*RATE_RANGE), 3), "peak_db": round(rng.uniform(*PEAK_DB_RANGE), 2)}
    if voice.engine == "espeak":
        params["espeak_wpm"] = round(ESPEAK_WPM * params["rate"])
        params["espeak_pitch"] = rng.randint(*ESPEAK_PITCH_RANGE)
    else:
        params["pitch_cents"] = rng.randint(*PITCH_CENTS_RANGE)
    if rng.random() < AUGMENT_FRACTION:
        effects = {}
        while not effects:
            if rng.random() < REVERB_PROB:
                effects["reverb"] = [rng.randint(*REVERB_RANGE), rng.randint(*ROOM_SCALE_RANGE)]
            if rng.random() < NOISE_PROB:
                effects["snr_db"] = round(rng.uniform(*SNR_DB_RANGE), 1)
                effects["noise"] = rng.choice(NOISE_COLOURS)
            if rng.random() < TEMPO_PROB:
                effects["tempo"] = round(rng.uniform(*TEMPO_RANGE), 3)
        params.update(effects)
    params["noise_seed"] = rng.getrandbits(32)  # additive noise and hibari's own noise component
    return params
