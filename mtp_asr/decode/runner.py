"""Decoding cut sets with a Speech-LLaMA model: batching, timing, statistics. Shared by `decode`, `benchmark`,
`transcribe` and MWER training.

Timing: the encoder (with the adapter and prompt) and the decoder loop are timed separately, synchronising the GPU
around each; RTF = (encoder + decoder seconds) / audio seconds.
"""
import functools
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from mtp_asr.data.dataset import AsrDataset, cut_frames
from mtp_asr.decode.beam import BEAM_METHODS, beam_search
from mtp_asr.decode.ctc_prefix import CTCPrefixScorer
from mtp_asr.decode.ctc_search import ctc_transcripts
from mtp_asr.decode.drafts import ctc_drafts
from mtp_asr.decode.rescore import ctc_hypotheses, rescore_nbest
from mtp_asr.decode.generate import METHODS, GenerateOutput, Hypothesis, generate
from mtp_asr.decode.lexicon import Lexicon
from mtp_asr.decode.tree_spec import parse_tree, tree_name
from mtp_asr.decode.verify_beam import verify_beam_search
from mtp_asr.decode.word_lm import WordLM
from mtp_asr.model.speech_llama import SpeechLlama
from mtp_asr.ngram import NgramLM
from mtp_asr.utils import Progress, cpu_threads

logger = logging.getLogger("mtp_asr")

BEAM_SEARCHES = BEAM_METHODS + ("mtp-beam-verify",)
CTC_METHOD = "ctc"  # the encoder's CTC head alone, no decoder call: what the LLM decoder adds to it
CTC_RESCORE = "ctc-rescore"  # the CTC head's N-best scored by the decoder in two calls (mtp_asr.decode.rescore)
JOINT_METHODS = ("beam", "mtp-beam-verify")  # with a CTC weight: joint CTC/attention decoding (decode.ctc_prefix)
DECODE_METHODS = (CTC_METHOD,) + METHODS + (CTC_RESCORE,) + BEAM_SEARCHES


@dataclass
class DecodeSettings:
    method: str = "greedy"
    threshold: float = 1.0  # tau of mtp-threshold and mtp-beam
    num_heads: Optional[int] = None  # heads used by MTP methods; None: all of the model's
    # Length limit: 10 + this x audio seconds (EOS excluded). A guard against runaway outputs that must never cut a
    # real transcript short: characters of fast speech come at up to 24 per second in the demo corpus (15, the
    # earlier value, cut 22% of its test utterances short; egs/synth/asr/RESULTS.md).
    max_tokens_per_second: float = 30.0
    beam_size: int = 4  # beam and mtp-beam
    nbest: Optional[int] = None  # hypotheses kept per utterance by beam methods; None: beam_size
    length_norm: float = 0.5  # beam methods rank by score / length ** length_norm
    max_draft: int = 32  # ctc-verify: draft tokens verified per decoder call at most
    draft_branches: int = 1  # ctc-verify: CTC continuations verified side by side after a correction
    draft_tree: str = ""  # mtp-verify, ctc-verify: the draft tree's shape (`--draft-tree`, tree_spec); "": a chain
    lexicon: str = ""  # a word list: emit only its words (`mtp_asr.decode.lexicon`); "": any token sequence
    # ctc, ctc-verify, ctc-rescore: the CTC transcript is a prefix beam search of this many prefixes (over the
    # lexicon's words with --lexicon); 1 without a lexicon: best path. On the demo's dev set with its lexicon, 16
    # rather than best path: CTC alone 19.3% WER instead of 40.2%, and 19% fewer ctc-verify calls
    # (egs/synth/asr/RESULTS.md).
    ctc_beam_size: int = 16
    # The CTC score's weight beside the decoder's (1 - this). ctc-rescore (default 0.5): chosen on the demo's dev set,
    # where 0.2 to 0.6 give WER within 0.2 points of each other. beam and mtp-beam-verify (default 0: the decoder
    # alone): joint CTC/attention decoding (mtp_asr.decode.ctc_prefix); demo dev, beam 4: beam 20.62% -> 14.27% WER
    # at 0.5 (0.3 to 0.6 within 0.7 points), mtp-beam-verify 15.48% with 0.31x of joint beam's decoder calls.
    ctc_weight: Optional[float] = None
    # beam and mtp-beam-verify with --lexicon: shallow fusion of a word n-gram LM (an ARPA file; mtp_asr.ngram,
    # mtp_asr.decode.word_lm), its charges weighted by lm_weight; "": none.
    word_lm: str = ""
    lm_weight: float = 0.5
    # ctc-rescore: also score the decoder's own N best transcripts (its calls added to the two of the rescoring): 1,
    # greedy's, found losslessly by ctc-verify from the CTC search's best hypothesis; N > 1, the N-best of
    # mtp-beam-verify with beam N; 0: none. On the demo's dev set 17.45% WER, 16.52% with 1, 16.18% with 4 (15.83%
    # with 4 and --ctc-weight 0.4).
    rescore_beam: int = 0
    # On the CPU the decoder loop runs on this many threads (0: torch's setting). Its matrix products have a few rows,
    # and with passive OpenMP waiting (mtp_asr.cli) waking a second thread costs about 100 us per product, more than
    # the product itself: one thread decodes the demo model 1.3x to 3.5x faster than two (egs/synth/asr/RESULTS.md).
    decoder_threads: int = 1

    def __post_init__(self):
        if self.method not in DECODE_METHODS:
            raise ValueError(f"--method must be one of {', '.join(DECODE_METHODS)} (got {self.method!r})")
        if self.threshold < 0:
            raise ValueError(f"--threshold must be >= 0 (got {self.threshold})")
        if self.num_heads is not None and self.num_heads < 1:
            raise ValueError(f"--num-heads must be >= 1 (got {self.num_heads})")
        if self.beam_size < 1:
            raise ValueError(f"--beam-size must be >= 1 (got {self.beam_size})")
        if self.nbest is not None and not 1 <= self.nbest <= self.beam_size:
            raise ValueError(f"--nbest must be in 1..--beam-size ({self.beam_size}) (got {self.nbest})")
        if self.length_norm < 0:
            raise ValueError(f"--length-norm must be >= 0 (got {self.length_norm})")
        if self.max_draft < 1:
            raise ValueError(f"--max-draft must be >= 1 (got {self.max_draft})")
        if self.max_tokens_per_second <= 0:
            raise ValueError(f"--max-tokens-per-second must be > 0 (got {self.max_tokens_per_second})")
        if self.draft_branches < 1:
            raise ValueError(f"--draft-branches must be >= 1 (got {self.draft_branches})")
        if self.decoder_threads < 0:
            raise ValueError(f"--decoder-threads must be >= 0 (got {self.decoder_threads})")
        self.draft_tree = self.draft_tree or ""
        self.lexicon = str(self.lexicon or "")
        if self.ctc_weight is None:
            self.ctc_weight = 0.5 if self.method == CTC_RESCORE else 0.0
        if self.ctc_weight and self.method not in (CTC_RESCORE,) + JOINT_METHODS:
            raise ValueError(f"--ctc-weight applies to ctc-rescore, beam and mtp-beam-verify only (got --method "
                             f"{self.method})")
        if not 0 <= self.ctc_weight <= 1:
            raise ValueError(f"--ctc-weight must be in [0, 1] (got {self.ctc_weight})")
        if self.rescore_beam < 0:
            raise ValueError(f"--rescore-beam must be >= 0 (got {self.rescore_beam})")
        if self.rescore_beam and self.method != CTC_RESCORE:
            raise ValueError(f"--rescore-beam applies to ctc-rescore only (got --method {self.method})")
        if self.ctc_beam_size < 1:
            raise ValueError(f"--ctc-beam-size must be >= 1 (got {self.ctc_beam_size})")
        if self.lexicon and not Path(self.lexicon).is_file():
            raise ValueError(f"--lexicon {self.lexicon} does not exist")
        self.word_lm = str(self.word_lm or "")
        if self.word_lm:
            if self.method not in JOINT_METHODS:
                raise ValueError(f"--word-lm applies to beam and mtp-beam-verify only (got --method {self.method})")
            if not self.lexicon:
                raise ValueError("--word-lm needs --lexicon: the LM scores words, so the search must spell known ones")
            if not Path(self.word_lm).is_file():
                raise ValueError(f"--word-lm {self.word_lm} does not exist")
        if self.lm_weight < 0:
            raise ValueError(f"--lm-weight must be >= 0 (got {self.lm_weight})")
        parse_tree(self.draft_tree)  # a clear error now rather than at the first batch
        if self.draft_tree and self.method not in ("mtp-verify", "ctc-verify"):
            raise ValueError(f"--draft-tree applies to mtp-verify and ctc-verify only (got --method {self.method})")

    @property
    def is_beam(self) -> bool:
        return self.method in BEAM_SEARCHES

    @property
    def uses_ctc(self) -> bool:
        """Whether the method reads the CTC head's log-probabilities."""
        return self.searches_ctc or self.joint_ctc

    @property
    def searches_ctc(self) -> bool:
        """Whether the method starts from the CTC head's prefix beam search (`--ctc-beam-size`)."""
        return self.method in (CTC_METHOD, "ctc-verify", CTC_RESCORE)

    @property
    def joint_ctc(self) -> bool:
        """Joint CTC/attention beam search (beam or mtp-beam-verify with a CTC weight)."""
        return self.method in JOINT_METHODS and self.ctc_weight > 0

    @property
    def uses_threshold(self) -> bool:
        return self.method in ("mtp-threshold", "mtp-beam")

    def label(self) -> str:
        text = self.method
        if self.method not in ("greedy", "beam") and self.num_heads:
            text += f"-K{self.num_heads}"
        if self.uses_threshold:
            text += f"-tau{self.threshold:g}"
        if self.method == "ctc-verify":
            text += f"-D{self.max_draft}" + (f"-br{self.draft_branches}" if self.draft_branches > 1 else "")
        if self.joint_ctc:
            text += f"-ctc{self.ctc_weight:g}"
        if self.word_lm:
            text += f"-lm{self.lm_weight:g}"
        if self.searches_ctc and self.ctc_beam_size != DecodeSettings.ctc_beam_size:
            text += f"-ctcB{self.ctc_beam_size}"
        if self.method == CTC_RESCORE:
            text += f"-w{self.ctc_weight:g}" + (f"-plusB{self.rescore_beam}" if self.rescore_beam else "")
        if tree_name(self.draft_tree):
            text += "-tree" + tree_name(self.draft_tree)
        if self.lexicon:
            text += "-lex"
        if self.is_beam:
            text += f"-B{self.beam_size}"
            if self.length_norm != DecodeSettings.length_norm:
                text += f"-lnorm{self.length_norm:g}"
        return text


@dataclass
class DecodeResult:
    settings: DecodeSettings
    results: list = field(default_factory=list)  # (cut_id, reference, hypothesis)
    tokens: dict = field(default_factory=dict)  # cut_id -> token ids
    calls: dict = field(default_factory=dict)  # cut_id -> decoder calls
    finished: dict = field(default_factory=dict)  # cut_id -> whether EOS ended it (False: the length limit)
    nbest: dict = field(default_factory=dict)  # cut_id -> N-best list of dicts (beam methods only)
    num_tokens: int = 0
    num_decoder_calls: int = 0  # summed over utterances (batch-independent)
    num_batch_calls: int = 0  # forward passes actually run
    audio_seconds: float = 0.0
    encoder_seconds: float = 0.0  # the encoder pass (and the CTC head's log-probabilities)
    decoder_seconds: float = 0.0  # everything after it: decoder calls, and any search over the CTC head's output
    num_skipped: int = 0
    accepted_per_head: list = field(default_factory=list)
    accepted_from_ctc: int = 0  # ctc-verify: emitted tokens that were CTC draft tokens

    @property
    def num_length_limited(self) -> int:
        """Utterances whose output the length limit ended (no EOS): cut short, or a runaway."""
        return sum(not done for done in self.finished.values())

    def summary(self) -> dict:
        secs = self.encoder_seconds + self.decoder_seconds
        return {
            "method": self.settings.method,
            "threshold": self.settings.threshold if self.settings.uses_threshold else None,
            "num_heads": self.settings.num_heads,
            "beam_size": self.settings.beam_size if self.settings.is_beam else None,
            "length_norm": self.settings.length_norm if self.settings.is_beam else None,
            "draft_tree": self.settings.draft_tree or None,
            "lexicon": self.settings.lexicon or None,
            "max_draft": self.settings.max_draft if self.settings.method == "ctc-verify" else None,
            "draft_branches": self.settings.draft_branches if self.settings.method == "ctc-verify" else None,
            "ctc_beam_size": self.settings.ctc_beam_size if self.settings.searches_ctc else None,
            "ctc_weight": self.settings.ctc_weight if self.settings.method == CTC_RESCORE or self.settings.joint_ctc
            else None,
            "word_lm": self.settings.word_lm or None,
            "lm_weight": self.settings.lm_weight if self.settings.word_lm else None,
            "rescore_beam": self.settings.rescore_beam if self.settings.method == CTC_RESCORE else None,
            "decoder_threads": self.settings.decoder_threads or None,
            "num_utts": len(self.results),
            "num_skipped": self.num_skipped,
            "max_tokens_per_second": self.settings.max_tokens_per_second,
            "num_length_limited": self.num_length_limited,
            "audio_seconds": round(self.audio_seconds, 3),
            "num_tokens": self.num_tokens,
            "num_decoder_calls": self.num_decoder_calls,
            "num_batch_calls": self.num_batch_calls,
            "tokens_per_call": round(self.num_tokens / self.num_decoder_calls, 4) if self.num_decoder_calls else None,
            "accepted_per_head": self.accepted_per_head,
            "accepted_from_ctc": self.accepted_from_ctc if self.settings.method == "ctc-verify" else None,
            "encoder_seconds": round(self.encoder_seconds, 4),
            "decoder_seconds": round(self.decoder_seconds, 4),
            "rtf": round(secs / max(self.audio_seconds, 1e-9), 5),
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batches_by_size(cuts, batch_size: int) -> list:
    """Cuts sorted by duration (longest first, so memory peaks early) in groups of `batch_size`."""
    ordered = sorted(cuts, key=lambda c: (-c.duration, c.id))
    return [ordered[i: i + batch_size] for i in range(0, len(ordered), batch_size)]


@torch.inference_mode()
def decode_batch(model: SpeechLlama, feats: torch.Tensor, feat_lens: torch.Tensor, durations: Sequence[float],
                 settings: DecodeSettings, tokenizer):
    """(GenerateOutput or BeamOutput, encoder seconds, decoder seconds) for one padded batch of features.
    `tokenizer` (the decoder's) re-tokenises ctc-verify's drafts when the CTC head has a vocabulary of its own."""
    device = next(model.parameters()).device
    feats, feat_lens = feats.to(device), feat_lens.to(device)
    _sync(device)
    t0 = time.perf_counter()
    enc = model.encode(feats, feat_lens)
    prefix, prefix_lens = model.prompt(enc.audio, enc.audio_lens)
    log_probs = None
    if settings.uses_ctc:
        if model.encoder.ctc_head is None:
            raise ValueError(f"{settings.method} needs a model with a CTC head (model.encoder.ctc: true)")
        log_probs = model.encoder.ctc_log_probs(enc.frames)
    _sync(device)
    t1 = time.perf_counter()
    # Decoding starts here: the CTC head's search (a beam search over the lexicon costs milliseconds per utterance on
    # a CPU) is timed with the decoder calls it saves.
    drafts = nbest = joint = None
    if settings.joint_ctc:
        if model.ctc_tokenizer is not None:
            raise ValueError(f"joint CTC/attention decoding ({settings.method} with --ctc-weight) needs a CTC head "
                             "over the decoder's tokens; this model's has a vocabulary of its own")
        joint = CTCPrefixScorer(log_probs, enc.frame_lens, model.encoder.blank_id, model.lm.eos_id)
    if settings.searches_ctc:
        ctc_lexicon = load_lexicon(settings.lexicon, model.ctc_tokenizer or tokenizer) if settings.lexicon else None
        if settings.method == CTC_METHOD:  # the transcript, in the CTC head's own tokens (see spelling_tokenizer)
            hyps = ctc_transcripts(log_probs, enc.frame_lens, model.encoder.blank_id, settings.ctc_beam_size,
                                   ctc_lexicon)
            return GenerateOutput([Hypothesis(h, decoder_calls=0, finished=True) for h in hyps], batch_calls=0), \
                t1 - t0, time.perf_counter() - t1
        if settings.method == CTC_RESCORE:
            nbest = ctc_hypotheses(log_probs, enc.frame_lens, model.encoder.blank_id, settings.ctc_beam_size,
                                   ctc_lexicon, model.ctc_tokenizer, tokenizer)
        else:
            drafts = ctc_drafts(log_probs, enc.frame_lens, model.encoder.blank_id, model.ctc_tokenizer, tokenizer,
                                settings.ctc_beam_size, ctc_lexicon)
    limits = torch.tensor(length_limits(model, feat_lens.tolist(), durations, settings.max_tokens_per_second),
                          device=device)
    lexicon = load_lexicon(settings.lexicon, tokenizer) if settings.lexicon else None
    with cpu_threads(settings.decoder_threads, device):
        if settings.method == CTC_RESCORE:
            own = _decoder_nbest(model, prefix, prefix_lens, settings, limits, nbest, lexicon)
            if own is not None:
                nbest = [hyps + [(_ctc_spelling(model, tokenizer, t), t) for t in extra]
                         for hyps, extra in zip(nbest, own[0])]
            out = rescore_nbest(model.lm, prefix, prefix_lens, nbest, log_probs, enc.frame_lens,
                                model.encoder.blank_id, settings.ctc_weight, limits.tolist())
            if own is not None:
                for h, calls in zip(out.hyps, own[1]):
                    h.decoder_calls += calls
                out.batch_calls += own[2]
        else:
            word_lm = load_word_lm(settings.word_lm, settings.lm_weight, lexicon) if settings.word_lm else None
            out = _search(model, prefix, prefix_lens, settings, limits, drafts, lexicon, joint, word_lm)
    _sync(device)
    return out, t1 - t0, time.perf_counter() - t1


def _decoder_nbest(model: SpeechLlama, prefix, prefix_lens, settings: DecodeSettings, limits, nbest: list,
                   lexicon) -> Optional[tuple]:
    """ctc-rescore's own transcripts of the decoder (`DecodeSettings.rescore_beam`): per row the token lists, per row
    the decoder calls, and the batch's calls; None without any."""
    if settings.rescore_beam == 1:  # greedy's transcript, verified from the CTC search's best hypothesis
        out = generate(model.lm, prefix, prefix_lens, "ctc-verify", max_new_tokens=limits,
                       drafts=[hyps[0][1] for hyps in nbest], max_draft=settings.max_draft, lexicon=lexicon)
        return [[h.tokens] for h in out.hyps], [h.decoder_calls for h in out.hyps], out.batch_calls
    if settings.rescore_beam > 1:
        out = verify_beam_search(model.lm, prefix, prefix_lens, settings.num_heads, limits, settings.rescore_beam,
                                 settings.rescore_beam, settings.length_norm, lexicon)
        return ([[h.tokens for h in hyps] for hyps in out.nbest], [h.decoder_calls for h in out.hyps],
                out.batch_calls)
    return None


def _ctc_spelling(model: SpeechLlama, tokenizer, tokens: list) -> list:
    """Decoder tokens in the CTC head's tokens (re-tokenised text when it has its own vocabulary)."""
    return tokens if model.ctc_tokenizer is None else model.ctc_tokenizer.encode(tokenizer.decode(tokens))


def spelling_tokenizer(model: SpeechLlama, settings: DecodeSettings, tokenizer):
    """The tokenizer that spells a method's output tokens: the decoder's, or for ctc the CTC head's own (its words
    need not be spellable in the decoder's tokens)."""
    return (model.ctc_tokenizer or tokenizer) if settings.method == CTC_METHOD else tokenizer


def length_limits(model: SpeechLlama, feat_lens: Sequence[int], durations: Sequence[float],
                  tokens_per_second: float = DecodeSettings.max_tokens_per_second) -> list:
    """Tokens each utterance may emit (EOS excluded): 10 + tokens_per_second x its seconds, within the decoder's room
    after its prompt (`SpeechLlama.max_new_tokens`). Decoding and MWER's N-best search both use it."""
    return [min(int(10 + tokens_per_second * d), model.max_new_tokens(int(n))) for n, d in zip(feat_lens, durations)]


@functools.lru_cache(maxsize=4)
def load_lexicon(path: str, tokenizer) -> Lexicon:
    """The lexicon of a decode run, built once per (file, tokenizer) and reused by every batch."""
    lexicon = Lexicon.from_file(path, tokenizer)
    logger.info("lexicon %s: %d words, %d states", path, len(lexicon), lexicon.num_states)
    return lexicon


@functools.lru_cache(maxsize=2)
def load_word_lm(path: str, weight: float, lexicon: Lexicon) -> WordLM:
    """The word LM fusion of a decode run, over its lexicon (the n-grams of other words left out), built once and
    reused by every batch."""
    ngram = NgramLM.read_arpa(path, vocabulary=lexicon.words)
    logger.info("word LM %s: order %d, %d n-grams over the lexicon's words", path, ngram.order, len(ngram.prob))
    return WordLM(ngram, lexicon, weight)


def _search(model: SpeechLlama, prefix, prefix_lens, settings: DecodeSettings, limits, drafts, lexicon, joint=None,
            word_lm=None):
    if settings.method == "mtp-beam-verify":
        return verify_beam_search(model.lm, prefix, prefix_lens, settings.num_heads, limits, settings.beam_size,
                                  settings.nbest, settings.length_norm, lexicon, joint, settings.ctc_weight, word_lm)
    if settings.is_beam:
        return beam_search(model.lm, prefix, prefix_lens, settings.method, settings.num_heads, settings.threshold,
                           limits, settings.beam_size, settings.nbest, settings.length_norm, lexicon=lexicon,
                           ctc=joint, ctc_weight=settings.ctc_weight, word_lm=word_lm)
    return generate(model.lm, prefix, prefix_lens, settings.method, settings.num_heads, settings.threshold,
                    limits, drafts=drafts, max_draft=settings.max_draft, draft_branches=settings.draft_branches,
                    draft_tree=settings.draft_tree, lexicon=lexicon)


def decode_cuts(model: SpeechLlama, tokenizer, cuts, settings: DecodeSettings, batch_size: int = 16,
                desc: str = "decode") -> DecodeResult:
    dataset = AsrDataset(None)
    res = DecodeResult(settings)
    batches = batches_by_size(cuts, batch_size)
    bar = Progress(f"{desc} ({settings.label()})", total=sum(len(b) for b in batches), unit="utts")
    head_counts = None
    spelling = spelling_tokenizer(model, settings, tokenizer)
    for group in batches:
        fits = []
        for cut in group:
            if model.max_new_tokens(cut_frames(cut)) >= 1:
                fits.append(cut)
            else:
                logger.warning("skipping cut %s: %.1f s of audio is too long for the decoder (max_seq_len %d)",
                               cut.id, cut.duration, model.cfg.decoder.max_seq_len)
        res.num_skipped += len(group) - len(fits)
        if not fits:
            continue
        batch = dataset[fits]
        res.num_skipped += batch["num_skipped"]
        if not batch["cut_ids"]:
            continue
        out, enc_s, dec_s = decode_batch(model, batch["feats"], batch["feat_lens"], batch["durations"], settings,
                                          tokenizer)
        res.encoder_seconds += enc_s
        res.decoder_seconds += dec_s
        res.num_batch_calls += out.batch_calls
        res.audio_seconds += sum(batch["durations"])
        head_counts = out.accepted_per_head if head_counts is None else [
            a + b for a, b in zip(head_counts, out.accepted_per_head)]
        res.accepted_from_ctc += getattr(out, "accepted_external", 0)
        for i, (cut_id, ref, hyp) in enumerate(zip(batch["cut_ids"], batch["texts"], out.hyps)):
            res.results.append((cut_id, ref, spelling.decode(hyp.tokens)))
            res.tokens[cut_id] = hyp.tokens
            res.calls[cut_id] = hyp.decoder_calls
            res.finished[cut_id] = hyp.finished
            res.num_tokens += len(hyp.tokens)
            res.num_decoder_calls += hyp.decoder_calls
            if settings.is_beam:
                res.nbest[cut_id] = [{"text": tokenizer.decode(h.tokens), **asdict(h)} for h in out.nbest[i]]
        bar.update(len(group))
    bar.close(f"{res.num_tokens / max(res.num_decoder_calls, 1):.2f} tokens/call")
    if res.num_length_limited:
        logger.warning("%s: %d of %d utterances ended at the length limit (10 + %g tokens per second of audio) "
                       "without EOS: cut short, or runaways; --max-tokens-per-second raises the limit", desc,
                       res.num_length_limited, len(res.results), settings.max_tokens_per_second)
    res.accepted_per_head = head_counts or []
    return res
