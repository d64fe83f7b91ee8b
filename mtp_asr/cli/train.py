"""Training commands: `pretrain-lm`, `train`, `mwer`, `average`, `distill-heads`, `export` (thin wrappers over
mtp_asr.train)."""
import sys
from pathlib import Path

import click

from mtp_asr.cli import main
from mtp_asr.cli.common import library_call

CONFIG = click.Path(exists=True, dir_okay=False, path_type=Path)


def _config(config_path, overrides) -> dict:
    from mtp_asr.config import apply_overrides, load_yaml

    return apply_overrides(load_yaml(config_path) if config_path else {}, overrides)


common_options = [
    click.option("--config", "-c", "config_path", type=CONFIG, help="YAML config (see egs/*/asr/conf/)."),
    click.option("--exp-dir", type=click.Path(file_okay=False, path_type=Path), required=True,
                 help="Checkpoints, logs and TensorBoard files go here; an existing run in it is resumed."),
    click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                 help="Override a config value, e.g. --set optim.lr=5e-4 --set model.heads.num_heads=4 (repeatable)."),
    click.option("--no-resume", is_flag=True, help="Start afresh even if EXP_DIR holds checkpoints."),
]


def with_common(fn):
    for option in reversed(common_options):
        fn = option(fn)
    return fn


@main.command("pretrain-lm")
@with_common
@library_call
def pretrain_lm_cmd(config_path, exp_dir, overrides, no_resume):
    """Train the decoder LLM (with its MTP heads) on text alone.

    The config has sections `decoder`, `heads`, `optim`, `data` (train_text, valid_text: files with one sentence per
    line; tokenizer; max_tokens) and the loop settings (num_epochs, max_steps, save_every_n, ...). Writes
    EXP_DIR/epoch-N.pt checkpoints that `train` takes as `init_lm`. Runs under torchrun for several processes.
    """
    from mtp_asr.train.run import train_lm

    sys.exit(train_lm(_config(config_path, overrides), exp_dir, resume=not no_resume))


@main.command("train")
@with_common
@click.option("--ctc-only", is_flag=True, help="Train only the encoder, with the CTC loss (encoder pre-training).")
@library_call
def train_cmd(config_path, exp_dir, overrides, no_resume, ctc_only):
    """Train Speech-LLaMA with K multi-token-prediction heads on Lhotse cuts with features.

    The config has sections `model` (encoder, adapter, decoder, heads), `data` (train_cuts, valid_cuts, tokenizer,
    ctc_tokenizer: the CTC head's own vocabulary if it has one, max_duration), `optim`, `spec_augment` and the loop
    settings (num_epochs, ctc_weight, freeze, init_lm, init_encoder, ...). Progress lines and TensorBoard scalars
    (EXP_DIR/tensorboard) on rank 0; checkpoints EXP_DIR/epoch-N.pt and checkpoint-STEP.pt, written atomically; a
    rerun resumes exactly. For several processes:
    torchrun --nproc_per_node N $(which mtp-asr) train ...
    """
    from mtp_asr.train.run import train_speech

    sys.exit(train_speech(_config(config_path, overrides), exp_dir, resume=not no_resume, ctc_only=ctc_only))


@main.command("mwer")
@with_common
@click.option("--init", "init_checkpoint", type=CONFIG, required=True,
              help="The trained model to fine-tune (its architecture and tokenizer are used).")
@library_call
def mwer_cmd(config_path, exp_dir, overrides, no_resume, init_checkpoint):
    """Minimum-WER fine-tuning on N-best lists from the prefix-based MTP beam search, made on the fly.

    Config: the `data`, `optim` and loop sections of `train`, plus nbest, beam_size, threshold (mtp-beam's tau),
    num_heads, ce_weight (lambda, the weight of the cross-entropy kept beside the MWER loss) and mwer_source
    (nbest | lattice). TensorBoard: MWER loss, expected WER, mean N-best WER, oracle WER, the search's tokens per
    call. Checkpoints and resume as in `train`.
    """
    from mtp_asr.train.run import train_mwer

    sys.exit(train_mwer(_config(config_path, overrides), exp_dir, init_checkpoint, resume=not no_resume))


@main.command("average")
@click.option("--exp-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--epoch", type=click.IntRange(min=1), required=True, help="Last epoch to average.")
@click.option("--avg", type=click.IntRange(min=1), default=1, show_default=True, help="Number of epochs to average.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Output file (default EXP_DIR/avg-epoch-E-avg-A.pt).")
@library_call
def average_cmd(exp_dir, epoch, avg, out):
    """Average the models of epochs EPOCH-AVG+1 .. EPOCH into one checkpoint (model only, decodable on its own)."""
    from mtp_asr.train.average import average_epochs

    average_epochs(exp_dir, epoch, avg, out)


@main.command("distill-heads")
@click.option("--checkpoint", type=CONFIG, required=True, help="The trained model (e.g. exp/asr/avg-epoch-E-avg-A.pt).")
@click.option("--cuts", "manifests", type=CONFIG, multiple=True, required=True,
              help="Cuts with features to decode for the self-labels (usually the training cuts); repeatable.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The model with distilled heads (model only, like `average` writes).")
@click.option("--steps", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Optimizer steps on heads 2..K, one batch of cached states each.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=3e-3, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Utterances per batch when decoding and caching.")
@click.option("--max-cuts", type=click.IntRange(min=1), default=5000, show_default=True,
              help="Use a random subset of N cuts at most: the trunk's states of all of them are held in memory.")
@click.option("--soft-targets", is_flag=True,
              help="Fit head 1's distribution at each position instead of its greedy token.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@library_call
def distill_heads_cmd(checkpoint, manifests, out, steps, lr, batch_size, max_cuts, soft_targets, device):
    """Self-distil MTP heads 2..K: teach them the model's own greedy output instead of the reference transcripts.

    The cuts are decoded (mtp-verify, the same tokens as greedy), the frozen model is run once teacher-forced on
    those tokens, and heads 2..K alone are fitted to predict them. Head 1 and the trunk stay as they are, so greedy,
    mtp-verify and ctc-verify transcripts do not change; verification accepts more drafts. Logs how often each head
    agrees with greedy decoding on held-out batches, before and after.
    """
    from mtp_asr.train.distill import DistillSettings, distill_heads
    from mtp_asr.utils import pick_device

    settings = DistillSettings(steps, lr, batch_size, max_cuts, soft_targets=soft_targets)
    distill_heads(checkpoint, manifests, out, settings, pick_device(device))


@main.command("export")
@click.argument("checkpoint", type=CONFIG)
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["safetensors", "hf-decoder"]), default="safetensors",
              show_default=True,
              help="safetensors: the whole model as model.safetensors + config.json + tokenizer.model; "
                   "hf-decoder: the decoder as a Hugging Face LLaMA directory.")
@library_call
def export_cmd(checkpoint, out_dir, fmt):
    """Export a checkpoint's model without pickles: safetensors, or the decoder in Hugging Face LLaMA format."""
    from mtp_asr.train.export import export_checkpoint

    export_checkpoint(checkpoint, out_dir, fmt)


@main.command("model-info")
@click.option("--config", "-c", "config_path", type=CONFIG, required=True, help="A train config (its `model`).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config value (repeatable).")
@click.option("--vocab-size", type=click.IntRange(min=2), help="Vocabulary size, when the config leaves it out.")
@click.option("--decoder-config", type=CONFIG, help="Take model.decoder from this LM config's `decoder` section.")
@library_call
def model_info_cmd(config_path, overrides, vocab_size, decoder_config):
    """Parameter counts per component, for each MTP head kind (linear, latent, medusa, layer, hydra)."""
    from mtp_asr.config import load_yaml
    from mtp_asr.model.info import markdown, parameter_table

    model = _config(config_path, overrides).get("model", {})
    decoder = model.setdefault("decoder", {})
    if decoder_config:
        decoder.update(load_yaml(decoder_config).get("decoder", {}))
    if vocab_size:
        decoder["vocab_size"] = vocab_size
    if model.get("audio_position_rate") == "auto":  # measured on the training cuts by `train`; no parameters
        model["audio_position_rate"] = 0.0
    click.echo(markdown(parameter_table(model)))
