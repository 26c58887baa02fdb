"""Score a wav2vec 2.0 upstream on labelled speech: the SUPERB protocols, over seeds.

    import speechssl.finetune as sf
    result = sf.finetune(model="runs/wav2vec2_tiny/model", task="asterisk-speakers", protocol="probe", seeds=[0, 1, 2])
    print(result.summary())            # accuracy 0.93 ± 0.01 over 3 seeds ...
    print(result.layer_weights)        # per seed: the learned softmax weight of every hidden layer

Two protocols, each run once per seed (mean ± std reported):

- ``probe`` (SUPERB's weighted-layer probe): the upstream frozen; every hidden state (the CNN
  features projected in, then each transformer layer) is layer-normalised and mixed by learnable
  softmax weights (they sum to one); a light head reads the mix -- mean-pool + linear for
  classification, a linear CTC head over characters for ASR. Since the upstream is frozen, its
  hidden states are computed once per split and the head is trained on them (Adam, early stopping
  on validation). The learned layer weights are reported: which layers carry what.
- ``full``: `Wav2Vec2ForSequenceClassification` / `Wav2Vec2ForCTC` from the checkpoint with the
  convolutional feature encoder frozen (as the wav2vec 2.0 paper fine-tunes), every other weight
  trained by the shared `sslcore.trainer.Trainer` through the `speech_finetune` objective; validation
  scored every `train.eval_every` steps, best weights kept, early stopping (`sslcore.finetune`).
  The exported folder loads in stock `pipeline("audio-classification")` /
  `pipeline("automatic-speech-recognition")` (a `Wav2Vec2Processor` with a character tokenizer).

`model.init: random` builds the same architecture with fresh weights: the scratch arm. Per-arm model
selection (`grid.learning_rates: [3e-5, 1e-4, 3e-4]`) and label budgets (`label_budget: 200`) work as in
text (`sslcore.finetune.select_on_validation`, `sslcore.splits.stratified_subset`): every full fine-tuning
setting is trained per seed, the best mean validation score (lowest CER for ASR) is kept, and only it is
scored on test.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from safetensors.torch import save_file
from torch import nn
from transformers import (
    Wav2Vec2Config,
    Wav2Vec2CTCTokenizer,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForCTC,
    Wav2Vec2ForSequenceClassification,
    Wav2Vec2Model,
    Wav2Vec2Processor,
)

from sslcore import config as cfg
from sslcore.errors import MissingPathError
from sslcore.finetune import (EarlyStopping, EarlyStoppingConfig, FinetuneResult, FinetuneTrainConfig, GridConfig,
                              select_on_validation, setting_tag)
from sslcore.finetune_runs import (EarlyStoppingObjective, build_run_config, check_seeds, finetune_keywords,
                                   finished_run, per_seed_scores, quiet_load_report, run_fingerprint, save_result,
                                   seed_config, seed_run_dir, train_with_early_stopping, with_setting, write_scores)
from sslcore.objective import LossContext, Ratio
from sslcore.registry import register_objective
from sslcore.run_config import RunConfig
from sslcore.splits import stratified_subset
from speechssl.metrics import LOWER_IS_BETTER, better, compute_speech_metrics
from speechssl.tasks import SAMPLING_RATE, SpeechTask, SpeechTaskConfig, load_speech_task

logger = logging.getLogger(__name__)

Protocol = Literal["probe", "full"]
PROTOCOL_NAMES = {"probe": "weighted-layer probe (frozen upstream)", "full": "full fine-tuning (conv encoder frozen)"}
WORD_DELIMITER = "|"


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass
class SpeechModelConfig:
    """The upstream to score and how to start it."""

    path: str = "runs/wav2vec2_tiny/model"
    """A wav2vec 2.0 model folder (a pretraining run's output_dir/model, or any stock Wav2Vec2 folder)."""
    init: Literal["pretrained", "random"] = "pretrained"
    """pretrained = the weights at `path`; random = the same config with fresh weights (the scratch arm)."""
    max_seconds: float = 4.0
    """Classification inputs are cut to their first this-many seconds (keywords and speaker ID need no more)."""
    max_asr_seconds: float = 20.0
    """ASR training utterances longer than this are left out of training (validation/test keep all)."""
    freeze_feature_encoder: bool = True
    """Full fine-tuning keeps the convolutional feature encoder frozen, as the wav2vec 2.0 paper does."""
    mask_time_prob: float = 0.05
    """SpecAugment-style time masking while fine-tuning CTC (transformers' Wav2Vec2 option); 0 = off."""


@dataclass
class WeightedProbeConfig:
    """The frozen-upstream weighted-layer probe (SUPERB)."""

    epochs: int = 200
    """Passes over the training split at most (early stopping usually ends sooner)."""
    learning_rate: float = 5e-3
    """Adam learning rate of the layer weights and the head."""
    batch_size: int = 32
    """Utterances per step."""
    weight_decay: float = 0.0
    """L2 on the head's weights."""
    patience: int = 15
    """Stop after this many epochs without a better validation score (for ASR, counted once the head emits
    anything: while it outputs only blanks, CER 1.0, it runs on, up to `epochs`)."""
    feature_batch_size: int = 16
    """Utterances per upstream forward pass when computing hidden states."""
    ctc_head: Literal["linear", "bilstm"] = "bilstm"
    """ASR head over the mixed frames: a linear layer, or a 1-layer BiLSTM then linear (SUPERB's ASR head is a
    2-layer BiLSTM; a linear one cannot spell from a small model's frames -- measured: CER stays ~0.93)."""
    lstm_size: int = 128
    """Hidden units per direction of the BiLSTM CTC head."""

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.learning_rate <= 0:
            raise cfg.ConfigError(f"probe.epochs, probe.batch_size and probe.learning_rate must be positive, got "
                                  f"{self.epochs}, {self.batch_size}, {self.learning_rate}")


@dataclass
class SpeechFinetuneTrainConfig(FinetuneTrainConfig):
    """The fine-tuning trainer options, with speech's defaults (shorter runs, smaller batches)."""

    output_dir: str = "runs/speech_finetune"
    """Parent folder of the runs: one `<task>/<protocol>-<init>-seed<N>/` per seed."""
    max_steps: int = 600
    """Optimizer steps per full fine-tuning run at most (early stopping may end it sooner)."""
    per_device_batch_size: int = 8
    """Utterances per micro-batch."""
    eval_every: int = 50
    """Score validation (and apply early stopping) every N steps."""
    log_every: int = 25
    """Log loss and throughput every N steps."""


@dataclass
class SpeechFinetuneConfig(RunConfig):
    """Score a wav2vec 2.0 upstream on a labelled speech task over several seeds."""

    objective: str = "speech_finetune"
    """Registered objective name."""
    task: SpeechTaskConfig = field(default_factory=SpeechTaskConfig)
    """The labelled speech (a built-in task, hf:NAME, or a local audiofolder)."""
    model: SpeechModelConfig = field(default_factory=SpeechModelConfig)
    """Upstream checkpoint and initialisation."""
    protocol: Protocol = "probe"
    """probe = frozen upstream + weighted layers + light head; full = fine-tune all but the conv encoder."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """One run per seed (new weights' init, data order; the scratch arm's whole upstream); mean ± std reported."""
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    """Validation-based model selection of the full protocol (the probe uses probe.patience)."""
    grid: GridConfig = field(default_factory=GridConfig)
    """Settings full fine-tuning tries per arm (learning rates, warm-up, steps); the best mean validation score
    over the seeds is kept and only it is scored on test. Empty = train's values alone."""
    label_budget: int | None = None
    """Labelled training utterances per seed: a stratified subset (by label; by speaker for ASR) of the training
    split, fixed per seed and nested across budgets, in both protocols. None = the whole split."""
    probe: WeightedProbeConfig = field(default_factory=WeightedProbeConfig)
    """Options of the probe protocol."""
    keep_checkpoints: bool = False
    """Keep each full run's training checkpoints; the exported best model is always kept."""
    train: SpeechFinetuneTrainConfig = field(default_factory=SpeechFinetuneTrainConfig)
    """Trainer options; `seed` and `output_dir` are set per run."""


@dataclass
class SpeechFinetuneResult(FinetuneResult):
    """`sslcore.finetune.FinetuneResult` with the speech protocols' names and the probe's layer weights."""

    PROTOCOL_NAMES = PROTOCOL_NAMES
    layer_weights: list[list[float]] = field(default_factory=list)
    """Probe only: per seed, the softmax weight of each hidden state (0 = the CNN features, then each layer)."""


# --------------------------------------------------------------------------------------------------
# Upstream, inputs, vocabulary
# --------------------------------------------------------------------------------------------------


def check_model_path(model: SpeechModelConfig) -> None:
    path = Path(model.path).expanduser()
    if not (path / "config.json").is_file():
        raise MissingPathError(
            f"model.path={model.path!r} is not a wav2vec 2.0 model folder (no config.json). Pretrain one with "
            "`python recipes/pretrain.py --config recipes/configs/wav2vec2_tiny.yaml` and use its "
            "output_dir/model, or give any stock Wav2Vec2 folder")
    kind = json.loads((path / "config.json").read_text()).get("model_type")
    if kind != "wav2vec2":
        raise MissingPathError(f"model.path={model.path!r} holds a {kind!r} model, not wav2vec2; speech tasks need a "
                               "wav2vec 2.0 upstream")


def upstream_config(model: SpeechModelConfig, **options: Any) -> Wav2Vec2Config:
    return Wav2Vec2Config.from_pretrained(model.path, **options)


def load_feature_extractor(model: SpeechModelConfig) -> Wav2Vec2FeatureExtractor:
    """The checkpoint's feature extractor, or the stock 16 kHz one (normalising) when the folder has none."""
    if (Path(model.path).expanduser() / "preprocessor_config.json").is_file():
        return Wav2Vec2FeatureExtractor.from_pretrained(model.path)
    return Wav2Vec2FeatureExtractor(sampling_rate=SAMPLING_RATE, do_normalize=True, return_attention_mask=True)


def build_upstream(model: SpeechModelConfig) -> Wav2Vec2Model:
    """`Wav2Vec2Model` from the checkpoint (its pretraining heads dropped) or the same config, fresh."""
    if model.init == "pretrained":
        with quiet_load_report():  # the unused quantizer/projection weights are expected
            return Wav2Vec2Model.from_pretrained(model.path)
    return Wav2Vec2Model(upstream_config(model))


def build_ctc_tokenizer(transcripts: list[str], out_dir: str | Path) -> Wav2Vec2CTCTokenizer:
    """A character tokenizer over the training transcripts' characters: <pad> (the CTC blank, id 0), <unk>,
    and `|` for the space between words (transformers' convention), saved in `out_dir`."""
    characters = sorted({c for text in transcripts for c in text} - {" "})
    vocab = {"<pad>": 0, "<unk>": 1, WORD_DELIMITER: 2, **{c: i + 3 for i, c in enumerate(characters)}}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    return Wav2Vec2CTCTokenizer(str(out_dir / "vocab.json"), unk_token="<unk>", pad_token="<pad>",
                                word_delimiter_token=WORD_DELIMITER, do_lower_case=False,
                                bos_token=None, eos_token=None)  # CTC needs no sentence markers: none to emit


def input_values(waveform: np.ndarray | list[float], extractor: Wav2Vec2FeatureExtractor,
                 max_samples: int | None) -> np.ndarray:
    """One clip as the model takes it: cut to `max_samples`, zero-mean unit-variance when the extractor says so."""
    waveform = np.asarray(waveform, dtype=np.float32)
    if max_samples is not None:
        waveform = waveform[:max_samples]
    if extractor.do_normalize:
        waveform = (waveform - waveform.mean()) / np.sqrt(waveform.var() + 1e-7)
    return waveform


def pad_batch(clips: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_values [B, T], attention_mask [B, T]) right-padded with zeros."""
    lengths = [len(c) for c in clips]
    values = torch.zeros(len(clips), max(lengths))
    mask = torch.zeros(len(clips), max(lengths), dtype=torch.long)
    for row, clip in enumerate(clips):
        values[row, :len(clip)] = torch.from_numpy(clip)
        mask[row, :len(clip)] = 1
    return values, mask


def frame_lengths(model: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """Output frames of each clip (the conv stack's arithmetic on the unpadded lengths)."""
    base = model.wav2vec2 if hasattr(model, "wav2vec2") else model
    return base._get_feat_extract_output_lengths(mask.sum(-1)).long()


def _max_samples(task: SpeechTask, model: SpeechModelConfig) -> int | None:
    return int(model.max_seconds * SAMPLING_RATE) if task.problem == "classification" else None


def _targets_of(task: SpeechTask, split: str) -> list:
    return list(task.splits[split][task.target_column])


def training_rows(task: SpeechTask, model: SpeechModelConfig, label_budget: int | None, seed: int) -> list[int]:
    """The training rows a seed learns from: for ASR, the utterances up to `model.max_asr_seconds` (very long ones
    cost much and teach little at this scale; they stay in validation/test); then, with a `label_budget`, a
    stratified subset of that many (by label, or by speaker for ASR), fixed per seed and nested across budgets."""
    train = task.splits["train"]
    rows = list(range(len(train)))
    if task.problem == "asr":
        limit = model.max_asr_seconds * SAMPLING_RATE
        rows = [i for i, n in enumerate(len(a) for a in train["audio"]) if n <= limit]
    if label_budget is None:
        return rows
    if not task.num_labels <= label_budget <= len(rows):
        raise cfg.ConfigError(f"label_budget={label_budget} must be from {max(task.num_labels, 1)} (one per class) to "
                              f"the {len(rows)} training utterances of {task.name!r}; or null for all of them")
    column = "label" if task.problem == "classification" else "speaker"
    strata = train[column] if column in train.column_names else [0] * len(train)
    ids = train["id"]
    chosen = stratified_subset([str(ids[i]) for i in rows], [strata[i] for i in rows], label_budget, seed,
                               salt="label-budget")
    return [rows[i] for i in chosen]


def greedy_decode(logits: torch.Tensor, lengths: torch.Tensor, tokenizer: Wav2Vec2CTCTokenizer) -> list[str]:
    """Best path: argmax per frame, repeats merged, blanks dropped (the tokenizer's CTC decode)."""
    ids = logits.argmax(-1)
    return [tokenizer.decode(ids[row, :int(lengths[row])].tolist()).strip() for row in range(len(ids))]


# --------------------------------------------------------------------------------------------------
# Weighted-layer probe
# --------------------------------------------------------------------------------------------------


def reversed_in_length(frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """`frames` [B, T, D] with each clip's first `lengths[b]` frames in reverse order and its padding left at
    the end (its own inverse)."""
    steps = torch.arange(frames.shape[1], device=frames.device).unsqueeze(0)
    lengths = lengths.to(frames.device).unsqueeze(1)
    order = torch.where(steps < lengths, lengths - 1 - steps, steps)
    return frames.gather(1, order.unsqueeze(-1).expand_as(frames))


class WeightedLayerProbe(nn.Module):
    """Softmax-weighted sum of the upstream's hidden states, then a linear head (SUPERB's downstream).

    Input: hidden states [B, L, D] (pooled, classification) or [B, L, T, D] (frames, CTC), already
    layer-normalised. Output: logits [B, C] or [B, T, C]. With `lstm_size`, a BiLSTM reads the mixed frames
    first: one LSTM forward in time and one over each clip reversed within its length, so neither reads
    padding before a clip's frames. (The same outputs as a bidirectional `nn.LSTM` over a packed sequence --
    tested -- but on padded tensors, which CPU runs through oneDNN's fused LSTM: forward + backward of a
    32 x 300-frame batch 0.33 s instead of 3.8-4.7 s packed.)
    """

    def __init__(self, num_layers: int, hidden_size: int, num_outputs: int, lstm_size: int = 0):
        super().__init__()
        self.layer_logits = nn.Parameter(torch.zeros(num_layers))  # uniform mix at the start, as s3prl
        self.lstm_forward = nn.LSTM(hidden_size, lstm_size, batch_first=True) if lstm_size else None
        self.lstm_backward = nn.LSTM(hidden_size, lstm_size, batch_first=True) if lstm_size else None
        self.head = nn.Linear(2 * lstm_size if lstm_size else hidden_size, num_outputs)

    def layer_weights(self) -> torch.Tensor:
        return torch.softmax(self.layer_logits, dim=0)

    def forward(self, hidden: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """`lengths`: true frames per clip, so the BiLSTM's backward direction starts at each clip's last frame;
        outputs past a clip's length are padding (CTC and decoding read up to the length only)."""
        mixed = torch.einsum("l,bl...->b...", self.layer_weights(), hidden)
        if self.lstm_forward is not None:
            if lengths is None:
                raise ValueError("a BiLSTM probe needs the clips' frame counts (lengths)")
            behind = reversed_in_length(self.lstm_backward(reversed_in_length(mixed, lengths))[0], lengths)
            mixed = torch.cat([self.lstm_forward(mixed)[0], behind], -1)
        return self.head(mixed)


@torch.no_grad()
def hidden_states(upstream: Wav2Vec2Model, clips: list[np.ndarray], batch_size: int,
                  pool: bool) -> list[torch.Tensor]:
    """Every hidden state of every clip, layer-normalised per frame (s3prl's featurizer does the same, so one
    learning rate suits layers of different scales): [L, D] mean-pooled over the clip's frames when `pool`,
    else [L, T, D]. Clips go through in length-sorted batches (little padding); the order is restored."""
    upstream.eval()
    order = np.argsort([len(c) for c in clips], kind="stable")
    out: list[torch.Tensor | None] = [None] * len(clips)
    for start in range(0, len(clips), batch_size):
        chosen = order[start:start + batch_size]
        values, mask = pad_batch([clips[i] for i in chosen])
        states = upstream(values, attention_mask=mask, output_hidden_states=True).hidden_states
        stacked = F.layer_norm(torch.stack(states, dim=1), (states[0].shape[-1],))  # [B, L, T, D]
        frames = frame_lengths(upstream, mask)
        for row, index in enumerate(chosen):
            clip_states = stacked[row, :, :int(frames[row])]
            out[index] = clip_states.mean(1) if pool else clip_states.clone()
    return out  # type: ignore[return-value]


def probe_inputs(config: SpeechFinetuneConfig, task: SpeechTask, seed: int) -> dict[str, list[torch.Tensor]]:
    """Frozen-upstream hidden states of every split; the seed matters only to a randomly initialised upstream."""
    set_seed(seed)
    upstream = build_upstream(config.model)
    extractor = load_feature_extractor(config.model)
    limit = _max_samples(task, config.model)
    return {name: hidden_states(upstream, [input_values(a, extractor, limit) for a in split["audio"]],
                                config.probe.feature_batch_size, pool=task.problem == "classification")
            for name, split in task.splits.items()}


def _probe_batch(features: list[torch.Tensor], rows: list[int], asr: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden [B, L, (T,) D], frame counts [B]) of the chosen rows, frames zero-padded for CTC."""
    if not asr:
        return torch.stack([features[i] for i in rows]), torch.ones(len(rows), dtype=torch.long)
    lengths = torch.tensor([features[i].shape[1] for i in rows])
    first = features[rows[0]]
    batch = torch.zeros(len(rows), first.shape[0], int(lengths.max()), first.shape[2])
    for slot, i in enumerate(rows):
        batch[slot, :, :features[i].shape[1]] = features[i]
    return batch, lengths


def _epoch_batches(features: list[torch.Tensor], rows: list[int], size: int, generator: torch.Generator,
                   by_length: bool) -> list[list[int]]:
    """One epoch's batches in a seeded random order; for CTC, batches of similar lengths (a 20 s prompt would
    pad a batch of 1 s ones twentyfold), shuffled as batches."""
    order = [rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()]
    if by_length:
        order.sort(key=lambda i: features[i].shape[1])
    batches = [order[start:start + size] for start in range(0, len(order), size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def _probe_loss(task: SpeechTask, logits: torch.Tensor, lengths: torch.Tensor, targets: list) -> torch.Tensor:
    if task.problem == "classification":
        return F.cross_entropy(logits, torch.tensor(targets))
    labels = [torch.tensor(t, dtype=torch.long) for t in targets]
    log_probs = logits.log_softmax(-1).transpose(0, 1)  # [T, B, C]
    return F.ctc_loss(log_probs, torch.cat(labels), lengths, torch.tensor([len(t) for t in labels]), blank=0,
                      reduction="mean", zero_infinity=True)


@torch.no_grad()
def _probe_scores(task: SpeechTask, probe: WeightedLayerProbe, features: list[torch.Tensor], references: list,
                  tokenizer: Wav2Vec2CTCTokenizer | None, batch_size: int) -> dict[str, float]:
    asr = task.problem == "asr"
    order = sorted(range(len(features)), key=lambda i: features[i].shape[-2] if asr else 0)  # little padding
    predictions: list = [None] * len(features)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        hidden, lengths = _probe_batch(features, rows, asr)
        logits = probe(hidden, lengths)
        decoded = greedy_decode(logits, lengths, tokenizer) if asr else logits.argmax(-1).tolist()
        for row, prediction in zip(rows, decoded):
            predictions[row] = prediction
    return compute_speech_metrics(task.metrics, predictions, references)


def run_probe(config: SpeechFinetuneConfig, task: SpeechTask, features: dict[str, list[torch.Tensor]], seed: int,
              out_dir: Path) -> dict[str, Any]:
    """Train the weighted-layer probe on frozen hidden states (Adam, seeded order), keep the best validation
    epoch, score test with it; save the head and its layer weights."""
    options, asr = config.probe, task.problem == "asr"
    torch.manual_seed(seed)
    tokenizer = build_ctc_tokenizer(_targets_of(task, "train"), out_dir) if asr else None
    targets = {name: ([tokenizer(t).input_ids for t in _targets_of(task, name)] if asr else _targets_of(task, name))
               for name in ("train",)}
    train_rows = training_rows(task, config.model, config.label_budget, seed)
    num_layers, hidden_size = features["train"][0].shape[0], features["train"][0].shape[-1]
    lstm = options.lstm_size if asr and options.ctc_head == "bilstm" else 0
    probe = WeightedLayerProbe(num_layers, hidden_size, len(tokenizer) if asr else task.num_labels, lstm_size=lstm)
    optimizer = torch.optim.Adam(probe.parameters(), lr=options.learning_rate)
    metric = config.early_stopping.metric or task.main_metric
    generator = torch.Generator().manual_seed(seed)
    best: dict[str, Any] | None = None
    misses, epoch = 0, 0
    for epoch in range(1, options.epochs + 1):
        probe.train()
        for rows in _epoch_batches(features["train"], train_rows, options.batch_size, generator, asr):
            hidden, lengths = _probe_batch(features["train"], rows, asr)
            loss = _probe_loss(task, probe(hidden, lengths), lengths, [targets["train"][i] for i in rows])
            if options.weight_decay:
                loss = loss + 0.5 * options.weight_decay * probe.head.weight.pow(2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        probe.eval()
        validation = _probe_scores(task, probe, features["validation"], _targets_of(task, "validation"), tokenizer,
                                   options.batch_size)
        logger.debug("probe epoch %d: validation %s", epoch, validation)
        if best is None or better(metric, validation[metric], best["validation"][metric]):
            best = {"validation": validation, "epoch": epoch, "state": copy.deepcopy(probe.state_dict())}
            misses = 0
        elif not (asr and best["validation"]["cer"] >= 1.0):
            # A CTC head first learns to emit only blanks (CER 1.0) and may take many epochs to start spelling
            # (a random-init upstream's ~100 here): patience counts from then, else it stops one arm unstarted.
            misses += 1
            if misses >= options.patience:
                break
    assert best is not None
    probe.load_state_dict(best["state"])
    test = _probe_scores(task, probe, features["test"], _targets_of(task, "test"), tokenizer, options.batch_size)
    weights = [round(float(w), 6) for w in probe.layer_weights().detach()]
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in probe.state_dict().items()}, str(out_dir / "probe_head.safetensors"))
    (out_dir / "probe_head.json").write_text(json.dumps({
        "upstream": config.model.path, "init": config.model.init, "seed": seed, "task": task.name,
        "layer_weights": weights, "best_epoch": best["epoch"], "epochs_run": epoch,
        "labels": task.label_names, "problem": task.problem,
        "usage": "hidden = layer_norm(stack(upstream hidden_states)); logits = head(sum_l softmax(layer_logits)_l "
                 "hidden_l) -- mean-pooled over frames for classification, per frame (CTC) for ASR"}, indent=1))
    return {"validation": best["validation"], "test": test, "model_dir": str(out_dir), "steps": best["epoch"],
            "layer_weights": weights, "train_rows": len(train_rows)}


# --------------------------------------------------------------------------------------------------
# Full fine-tuning: an objective on the shared trainer
# --------------------------------------------------------------------------------------------------


@register_objective
class SpeechFinetuneObjective(EarlyStoppingObjective):
    """Supervised fine-tuning of `Wav2Vec2ForSequenceClassification` / `Wav2Vec2ForCTC` on a speech task,
    conv feature encoder frozen, on the shared trainer (accumulation, clipping, schedules, checkpoints)."""

    name = "speech_finetune"
    config_class = SpeechFinetuneConfig
    unit = "samples"
    config: SpeechFinetuneConfig

    def __init__(self, config: SpeechFinetuneConfig):
        super().__init__(config)
        self.tokenizer: Wav2Vec2CTCTokenizer | None = None

    def prepare(self, accelerator=None) -> None:
        check_model_path(self.config.model)
        self.task = load_speech_task(self.config.task)
        self.extractor = load_feature_extractor(self.config.model)
        self.asr = self.task.problem == "asr"
        if self.asr:
            vocab_dir = Path(self.config.train.output_dir) / "vocab"
            self.tokenizer = build_ctc_tokenizer(_targets_of(self.task, "train"), vocab_dir)
        self.train_rows = self.task.splits["train"].select(
            training_rows(self.task, self.config.model, self.config.label_budget, self.config.train.seed))
        metric = self.config.early_stopping.metric or self.task.main_metric
        # The test split is scored after model selection, and only for the chosen setting (`finetune`).
        self.early_stopping = EarlyStopping(self.config.early_stopping, metric, self.task.metrics, self.score,
                                            task_name=self.task.name, lower_is_better=LOWER_IS_BETTER,
                                            score_test=False)

    def train_dataset(self):
        return self.train_rows

    def eval_dataset(self):
        return self.task.splits["validation"]

    def collate(self, examples: list[dict[str, Any]], seeds: list[int]) -> dict[str, torch.Tensor]:
        limit = _max_samples(self.task, self.config.model)
        values, mask = pad_batch([input_values(e["audio"], self.extractor, limit) for e in examples])
        batch = {"input_values": values, "attention_mask": mask}
        if self.asr:
            ids = [self.tokenizer(e["transcript"]).input_ids for e in examples]
            labels = torch.full((len(ids), max(len(i) for i in ids)), -100, dtype=torch.long)
            for row, row_ids in enumerate(ids):
                labels[row, :len(row_ids)] = torch.tensor(row_ids)
            batch["labels"] = labels
        else:
            batch["labels"] = torch.tensor([e["label"] for e in examples])
        return batch

    def build_model(self) -> nn.Module:
        model_config = self.config.model
        if self.asr:
            options = {"vocab_size": len(self.tokenizer), "pad_token_id": self.tokenizer.pad_token_id,
                       "ctc_loss_reduction": "sum", "ctc_zero_infinity": True,
                       "mask_time_prob": model_config.mask_time_prob, "layerdrop": 0.0}
            cls = Wav2Vec2ForCTC
        else:
            options = {"num_labels": self.task.num_labels, "id2label": dict(enumerate(self.task.label_names)),
                       "label2id": {n: i for i, n in enumerate(self.task.label_names)}, "mask_time_prob": 0.0,
                       "layerdrop": 0.0}
            cls = Wav2Vec2ForSequenceClassification
        if model_config.init == "pretrained":
            with quiet_load_report():  # the new head and the dropped pretraining heads are expected
                model = cls.from_pretrained(model_config.path, **options)
        else:
            model = cls(upstream_config(model_config, **options))
        if model_config.freeze_feature_encoder:
            model.freeze_feature_encoder()
        return model

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
             ctx: LossContext) -> tuple[torch.Tensor, dict[str, Any]]:
        out = model(**batch)
        rows = len(batch["labels"])
        if self.asr:  # CTC loss summed over the batch's utterances: a mean per utterance over the whole step
            return ctx.mean("loss", out.loss), {}
        total = ctx.mean("loss", out.loss * rows)
        return total, {"accuracy": Ratio((out.logits.detach().argmax(-1) == batch["labels"]).sum(), rows)}

    @torch.no_grad()
    def score(self, model: nn.Module, split: str, accelerator=None) -> dict[str, float]:
        """The task's metrics of `model` on one split (every process scores the whole split: they are small)."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        data = self.task.splits[split]
        limit = _max_samples(self.task, self.config.model)
        clips = [input_values(a, self.extractor, limit) for a in data["audio"]]
        order = np.argsort([len(c) for c in clips], kind="stable")
        predictions: list = [None] * len(clips)
        size = self.config.train.per_device_batch_size
        for start in range(0, len(clips), size):
            chosen = order[start:start + size]
            values, mask = pad_batch([clips[i] for i in chosen])
            logits = model(input_values=values.to(device), attention_mask=mask.to(device)).logits.float().cpu()
            if self.asr:
                decoded = greedy_decode(logits, frame_lengths(model, mask), self.tokenizer)
            else:
                decoded = logits.argmax(-1).tolist()
            for index, prediction in zip(chosen, decoded):
                predictions[index] = prediction
        model.train(was_training)
        return compute_speech_metrics(self.task.metrics, predictions, _targets_of(self.task, split))

    def export(self, model: nn.Module, out_dir: Path, summary: dict[str, Any]) -> Path:
        """The best validation weights as a stock transformers folder that `pipeline()` loads: with a
        `Wav2Vec2Processor` (feature extractor + character tokenizer) for ASR, the feature extractor for
        classification; and a model card."""
        out_dir = Path(out_dir)
        metrics = self.save_best(model, out_dir, summary)
        if self.asr:
            Wav2Vec2Processor(feature_extractor=self.extractor, tokenizer=self.tokenizer).save_pretrained(out_dir)
        else:
            self.extractor.save_pretrained(out_dir)
        pipeline_tag = "automatic-speech-recognition" if self.asr else "audio-classification"
        self.write_card(
            model, out_dir, metrics, task_name=self.task.name, detail="conv feature encoder frozen",
            training_data=self.task.description, pipeline_tag=pipeline_tag,
            tags=["audio", "speech", "wav2vec2", pipeline_tag, self.task.name],
            usage=f'from transformers import pipeline\nrun = pipeline("{pipeline_tag}", model="{out_dir}")\n'
                  'print(run({"raw": waveform_16khz, "sampling_rate": 16000}))')
        return out_dir


def _score_exported(objective: SpeechFinetuneObjective, model_dir: str) -> dict[str, float]:
    """Test scores of an exported fine-tuned model (the chosen setting's), with its run's objective."""
    cls = Wav2Vec2ForCTC if objective.asr else Wav2Vec2ForSequenceClassification
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return objective.score(cls.from_pretrained(model_dir).to(device), "test")


# --------------------------------------------------------------------------------------------------
# The API
# --------------------------------------------------------------------------------------------------


def build_speech_finetune_config(config: SpeechFinetuneConfig | str | Path | None = None,
                                 overrides: dict[str, Any] | list[str] | None = None) -> SpeechFinetuneConfig:
    """Defaults, then a YAML preset (or a config object), then overrides (CLI list or nested dict)."""
    return build_run_config(SpeechFinetuneConfig, config, overrides)


def finetune(model: str | None = None, task: str | SpeechTaskConfig | None = None, protocol: Protocol | None = None,
             seeds: list[int] | None = None, *, init: Literal["pretrained", "random"] | None = None,
             output_dir: str | None = None, config: SpeechFinetuneConfig | str | Path | None = None,
             overrides: dict[str, Any] | list[str] | None = None) -> SpeechFinetuneResult:
    """Score `model` on the speech `task` with `protocol` once per seed; test scores as mean ± std.

    Each seed's run lives in `<train.output_dir>/<protocol>-<init>-seed<N>/` with its `scores.json`. With a grid
    (`grid.learning_rates`), full fine-tuning trains every setting per seed (`...-lr1e-4-seed<N>/`), keeps the one
    with the best mean validation score and scores only its models on test (`result.selection`). The full
    protocol's fine-tuned models gain their scores in their model cards.
    """
    task_keys = cfg.to_dict(task) if isinstance(task, SpeechTaskConfig) else None if task is None else {"name": task}
    keywords = finetune_keywords(model, init, seeds, output_dir, task=task_keys, protocol=protocol)
    config = build_run_config(SpeechFinetuneConfig, config, overrides, keywords)
    check_seeds(config.seeds)
    check_model_path(config.model)
    task_data = load_speech_task(config.task)
    metric = config.early_stopping.metric or task_data.main_metric
    if metric not in task_data.metrics:
        raise ValueError(f"early_stopping.metric={metric!r} is not computed for task {task_data.name!r}; choose one "
                         f"of {task_data.metrics}")
    if config.label_budget is not None:
        training_rows(task_data, config.model, config.label_budget, config.seeds[0])  # a bad budget fails now

    def run_dir_of(seed: int, setting: dict[str, Any] | None = None) -> Path:
        return seed_run_dir(config.train.output_dir, config.protocol, config.model.init, config.label_budget, seed,
                            setting)

    every_run: list[dict[str, Any]] = []  # the grid's runs too: the arm's cost includes its search
    selection = None
    if config.protocol == "probe":
        runs, pretrained_features = [], None
        for seed in config.seeds:
            run = finished_run(config, seed, run_dir_of(seed))  # an interrupted benchmark's finished seeds
            if run is None:
                started = time.perf_counter()
                # A pretrained upstream's hidden states do not depend on the seed: computed once.
                features = pretrained_features or probe_inputs(config, task_data, seed)
                if config.model.init == "pretrained":
                    pretrained_features = features
                run = run_probe(config, task_data, features, seed, run_dir_of(seed) / "probe")
                run.update(seconds=round(time.perf_counter() - started, 1), config=run_fingerprint(config, seed))
                write_scores(run_dir_of(seed), run)
            runs.append(run)
        every_run = runs
    else:
        objectives: dict[tuple[str, int], SpeechFinetuneObjective] = {}

        def objective_of(setting: dict[str, Any], seed: int) -> SpeechFinetuneObjective:
            key = setting_tag(setting), seed
            if key not in objectives:
                objectives[key] = SpeechFinetuneObjective(seed_config(with_setting(config, setting), seed,
                                                                      run_dir_of(seed, setting)))
            return objectives[key]

        def train(setting: dict[str, Any], seed: int) -> dict[str, Any]:
            """One full fine-tuning run: early stopping on validation, the best weights exported; the test split is
            not touched (only the setting chosen on validation is scored on it, by its run's objective)."""
            run_dir, run_config = run_dir_of(seed, setting), with_setting(config, setting)
            run = finished_run(run_config, seed, run_dir)
            if run is None:
                objective = objective_of(setting, seed)
                started = time.perf_counter()
                run = train_with_early_stopping(objective, run_dir, config.keep_checkpoints,
                                                tolerate_failure=config.grid.searches)
                if not run.get("failed"):
                    run["train_rows"] = len(objective.train_rows)
                run.update(seconds=round(time.perf_counter() - started, 1), config=run_fingerprint(run_config, seed))
                write_scores(run_dir, run)
            every_run.append(run)
            return run

        def score_test(setting: dict[str, Any], seed: int, run: dict[str, Any]) -> dict[str, float]:
            objective = objective_of(setting, seed)
            if not hasattr(objective, "task"):  # a reused run: its objective has not loaded the task yet
                objective.prepare()
            test = _score_exported(objective, run["model_dir"])
            write_scores(run_dir_of(seed, setting), {**run, "test": test})
            return test

        selection, runs = select_on_validation(config.grid.settings(), config.seeds, train, score_test, metric,
                                               lower_is_better=metric in LOWER_IS_BETTER)
    result = SpeechFinetuneResult(
        task=task_data.name, protocol=config.protocol, model=config.model.path, init=config.model.init,
        seeds=list(config.seeds), main_metric=metric, **per_seed_scores(runs, task_data.metrics),
        output_dir=config.train.output_dir, dataset_id=task_data.dataset_id,
        seconds=sum(r["seconds"] for r in every_run),
        task_type="automatic-speech-recognition" if task_data.problem == "asr" else "audio-classification",
        lower_is_better=metric in LOWER_IS_BETTER, layer_weights=[r.get("layer_weights", []) for r in runs],
        selection=selection, label_budget=config.label_budget, train_examples=[r["train_rows"] for r in runs])
    save_result(result, model_cards=config.protocol == "full")
    return result


__all__ = ["PROTOCOL_NAMES", "SpeechFinetuneConfig", "SpeechFinetuneObjective", "SpeechFinetuneResult",
           "SpeechModelConfig", "WeightedLayerProbe", "WeightedProbeConfig", "build_ctc_tokenizer",
           "build_speech_finetune_config", "finetune", "greedy_decode", "hidden_states", "run_probe", "training_rows"]
