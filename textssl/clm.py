"""GPT next-token prediction (`GPT2LMHeadModel`) on packed blocks, with a fused vocab head + loss.

Documents are tokenized with a byte-level BPE trained locally, joined with `<|endoftext|>` between
them and cut into full blocks (no padding, so no attention mask: SDPA takes its causal fast path).

Where the speed over the `run_clm.py` way (HF `Trainer`, `model(**batch, labels=...)`) comes from,
all of it the same math:
- the vocab projection and the cross-entropy run fused, chunk by chunk (`fused_linear_cross_entropy`):
  the `[tokens, vocab]` logits are never materialised whole, and no log-softmax is stored for
  backward — the gradient is formed in the same pass. At a small width the vocab head is most of
  the compute and memory traffic of a GPT;
- no key/value cache is built during training (`use_cache=False`; `GPT2LMHeadModel` builds one by default);
- GPT-2's tanh-approximated GELU (`gelu_new`, 8 elementwise ops) runs as PyTorch's fused kernel
  (`gelu_pytorch_tanh`, the same function to float rounding);
- fused AdamW (as the HF Trainer also uses on torch >= 2.8).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, GenerationConfig, pipeline

from sslcore.config import to_dict
from sslcore.hub import write_model_card
from sslcore.objective import LossContext, Objective
from sslcore.registry import register_objective
from sslcore.run_config import RunConfig, TrainConfig
from textssl.data import TextDataConfig, describe_corpus, export_text_model, load_text, materialize
from textssl.masking import IGNORE_INDEX
from textssl.packing import pack_blocks, tokenize_documents
from textssl.tokenizer import TokenizerConfig

logger = logging.getLogger(__name__)

# The same function as GPT-2's "gelu_new", computed by one fused kernel instead of eight ops.
FUSED_ACTIVATIONS = {"gelu_new": "gelu_pytorch_tanh"}


@dataclass
class GPTModelConfig:
    """GPT-2 decoder shape (names as in `transformers.GPT2Config`; vocab size comes from the tokenizer)."""

    n_embd: int = 128
    """Width of the decoder."""
    n_layer: int = 2
    """Transformer blocks."""
    n_head: int = 2
    """Attention heads per block."""
    n_inner: int | None = None
    """Feed-forward width; None = 4 x n_embd."""
    n_positions: int = 1024
    """Longest sequence the position table covers (>= data.max_seq_length)."""
    activation_function: str = "gelu_new"
    """Feed-forward activation; GPT-2's gelu_new is run (and exported) as the fused gelu_pytorch_tanh."""
    resid_pdrop: float = 0.1
    """Dropout on the residual branches."""
    embd_pdrop: float = 0.1
    """Dropout on the embeddings."""
    attn_pdrop: float = 0.1
    """Dropout on attention weights."""
    layer_norm_epsilon: float = 1e-5
    """LayerNorm epsilon."""
    initializer_range: float = 0.02
    """Std of the normal init."""


@dataclass
class CLMHeadConfig:
    """How the vocab projection and the loss are computed."""

    fused_chunk_tokens: int = 4096
    """Tokens per chunk of the fused vocab projection + cross-entropy (bounds the logits held at once:
    chunk x vocab floats); 0 = the plain `lm_head` + `F.cross_entropy` path."""


@dataclass
class SampleConfig:
    """The text sample generated from the exported model with stock `pipeline("text-generation")`."""

    prompt: str = "The"
    """Prompt of the sample; empty = no sample."""
    max_new_tokens: int = 40
    """Tokens to generate."""
    top_k: int = 50
    """Sample from the top-k next tokens."""


@dataclass
class CLMConfig(RunConfig):
    """GPT next-token pretraining."""

    objective: str = "gpt_clm"
    """Registered objective name."""
    data: TextDataConfig = field(default_factory=TextDataConfig)
    """Corpus and block length."""
    tokenizer: TokenizerConfig = field(default_factory=lambda: TokenizerConfig(kind="bpe"))
    """Byte-level BPE tokenizer trained on the corpus (or a given one)."""
    model: GPTModelConfig = field(default_factory=GPTModelConfig)
    """Decoder shape."""
    head: CLMHeadConfig = field(default_factory=CLMHeadConfig)
    """Fused vocab head + loss."""
    sample: SampleConfig = field(default_factory=SampleConfig)
    """Text sample printed (and put in the model card) at export."""


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """mean CE(hidden @ weight.T, targets), chunk by chunk, with the gradients formed in the forward pass.

    For each chunk the logits are computed once, turned in place into softmax - onehot (the CE
    gradient), and folded into the gradients of `hidden` and `weight`; backward only scales them.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        exact = torch.promote_types(dtype, torch.float32)  # softmax and sums: at least fp32
        valid = targets != IGNORE_INDEX
        count = valid.sum().clamp(min=1).to(exact)
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=exact)
        total = torch.zeros((), dtype=exact, device=hidden.device)
        weight_c = weight.to(dtype)
        with torch.autocast(device, enabled=False):
            for start in range(0, hidden.shape[0], chunk_tokens):
                h = hidden[start:start + chunk_tokens].to(dtype)
                t = targets[start:start + chunk_tokens]
                keep = valid[start:start + chunk_tokens]
                t_safe = torch.where(keep, t, 0)
                logits = (h @ weight_c.T).to(exact)
                target_logit = logits.gather(1, t_safe[:, None]).squeeze(1)
                # Stable log-sum-exp, reusing exp(logits - max) for the softmax below.
                peak = logits.amax(1, keepdim=True)
                logits.sub_(peak).exp_()
                sum_exp = logits.sum(1, keepdim=True)
                log_z = (peak + sum_exp.log()).squeeze(1)
                total += torch.where(keep, log_z - target_logit, 0.0).sum()
                grad_logits = logits.div_(sum_exp)  # softmax
                grad_logits[torch.arange(len(t), device=t.device), t_safe] -= 1.0
                grad_logits = grad_logits.mul_((keep.to(exact) / count)[:, None]).to(dtype)
                grad_hidden[start:start + chunk_tokens] = grad_logits @ weight_c
                grad_weight += grad_logits.T @ h
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total / count

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output.to(grad_hidden.dtype), grad_weight * grad_output.to(grad_weight.dtype), \
            None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               chunk_tokens: int = 4096) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets` (-100 = ignored), without holding the
    full `[tokens, vocab]` logits: `hidden` is `[tokens, width]`, `weight` `[vocab, width]`.

    Same value and gradients as `F.cross_entropy(hidden @ weight.T, targets)`; without grad (eval)
    only the loss is computed.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _FusedLinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens)
    exact = torch.promote_types(hidden.dtype, torch.float32)
    total, valid = hidden.new_zeros((), dtype=exact), targets != IGNORE_INDEX
    for start in range(0, hidden.shape[0], chunk_tokens):
        logits = (hidden[start:start + chunk_tokens] @ weight.T).to(exact)
        total += torch.nn.functional.cross_entropy(logits, targets[start:start + chunk_tokens], reduction="sum")
    return total / valid.sum().clamp(min=1)


class CausalLMWithFusedLoss(nn.Module):
    """Wraps a `GPT2LMHeadModel`: forward(input_ids) -> mean next-token loss over the block.

    The decoder runs without a KV cache and without an attention mask (full blocks); the tied
    vocab head and the loss run fused (`fused_linear_cross_entropy`), all inside `forward` so DDP
    syncs every parameter.
    """

    def __init__(self, model: GPT2LMHeadModel, chunk_tokens: int):
        super().__init__()
        self.model, self.chunk_tokens = model, chunk_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.model.transformer(input_ids=input_ids, use_cache=False).last_hidden_state
        # Position t predicts token t+1: the last position has no target inside the block.
        hidden, targets = hidden[:, :-1].reshape(-1, hidden.shape[-1]), input_ids[:, 1:].reshape(-1)
        if self.chunk_tokens:
            return fused_linear_cross_entropy(hidden, self.model.lm_head.weight, targets, self.chunk_tokens)
        return nn.functional.cross_entropy(self.model.lm_head(hidden).float(), targets)


@register_objective
class CausalLMObjective(Objective):
    """GPT-2 next-token prediction on `<|endoftext|>`-separated packed blocks; exports `GPT2LMHeadModel`."""

    name = "gpt_clm"
    config_class = CLMConfig
    unit = "tokens"
    reports_perplexity = True
    config: CLMConfig

    def prepare(self, accelerator=None) -> None:
        data = self.config.data
        self.corpus, self.tokenizer = load_text(data, self.config.tokenizer)
        separator = self.tokenizer.eos_token_id
        if separator is None:
            raise ValueError("the tokenizer has no end-of-text token to separate documents; use tokenizer.kind "
                             "bpe or a tokenizer.path whose eos_token is set")
        self.blocks = {split: pack_blocks(tokenize_documents(docs, self.tokenizer, data.num_proc),
                                          data.max_seq_length, separator=separator, num_proc=data.num_proc)
                       for split, docs in self.corpus.items()}
        if "validation" in self.blocks:
            self.blocks["validation"] = materialize(self.blocks["validation"], data.max_eval_examples)
            if len(self.blocks["validation"]) == 0:
                logger.warning("the held-out documents fill no block of %d tokens: no eval perplexity",
                               data.max_seq_length)
        if isinstance(self.blocks["train"], datasets.Dataset) and len(self.blocks["train"]) == 0:
            raise ValueError(f"the corpus gave no block of {data.max_seq_length} tokens; "
                             "add documents or lower data.max_seq_length")
        self.blocks = {split: ds.with_format("torch") for split, ds in self.blocks.items()}

    def train_dataset(self):
        return self.blocks["train"]

    def eval_dataset(self):
        return self.blocks.get("validation")

    def collate(self, examples: list[dict[str, Any]], seeds: list[int]) -> dict[str, torch.Tensor]:
        # Next-token prediction draws nothing at random: the seeds are not needed.
        return {"input_ids": torch.stack([torch.as_tensor(e["input_ids"]) for e in examples]).long()}

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].numel()

    def targets(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        """Predicted tokens: every position but the last of each block."""
        rows, length = batch["input_ids"].shape
        return {"next_token": rows * (length - 1)}

    def build_model(self) -> nn.Module:
        model, data = self.config.model, self.config.data
        if model.n_positions < data.max_seq_length:
            raise ValueError(f"model.n_positions={model.n_positions} is below data.max_seq_length="
                             f"{data.max_seq_length}; raise it")
        eos = self.tokenizer.eos_token_id
        settings = {**vars(model), "activation_function": FUSED_ACTIVATIONS.get(model.activation_function,
                                                                                 model.activation_function)}
        config = GPT2Config(vocab_size=len(self.tokenizer), bos_token_id=eos, eos_token_id=eos, **settings)
        gpt = GPT2LMHeadModel(config)
        gpt.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
        return CausalLMWithFusedLoss(gpt, self.config.head.fused_chunk_tokens)

    def build_optimizer(self, model: nn.Module, args: TrainConfig) -> torch.optim.Optimizer:
        """AdamW, fused (one kernel per tensor instead of a pass over memory per operation)."""
        return torch.optim.AdamW(self.parameter_groups(model, args.weight_decay), lr=args.learning_rate,
                                 betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, fused=True)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
             ctx: LossContext) -> tuple[torch.Tensor, dict[str, Any]]:
        mean = model(**batch)  # blocks are full, so mean x predictions is the exact sum
        return ctx.mean("next_token", mean * self.targets(batch)["next_token"]), {}

    def export(self, model: CausalLMWithFusedLoss, out_dir: Path, summary: dict[str, Any]) -> Path:
        sample, shape = self.config.sample, self.config.model
        card = dict(
            config=self.config, training_data=describe_corpus(self.config.data, self.corpus),
            pipeline_tag="text-generation",
            usage='from transformers import pipeline\ngenerate = pipeline("text-generation", model="{path}")\n'
                  f'print(generate({sample.prompt or "The"!r}, max_new_tokens={sample.max_new_tokens})[0]'
                  '["generated_text"])')
        description = (f"A GPT-2 decoder ({shape.n_layer} layers, width {shape.n_embd}) pretrained with next-token "
                       f"prediction for {summary.get('steps')} steps."
                       + (f" Eval perplexity {summary['eval_perplexity']:.4g}." if "eval_perplexity" in summary else ""))
        out_dir = export_text_model(model.model, self.tokenizer, out_dir, summary=summary, description=description,
                                    **card)
        if sample.prompt:
            # Generated from the exported folder by the stock pipeline: proof the export works on its own.
            text = generate_sample(out_dir, sample)
            logger.info("sample from the exported model (stock pipeline, prompt %r):\n%s", sample.prompt, text)
            description += f"\n\nA sample (prompt {sample.prompt!r}, top-{sample.top_k} sampling):\n\n> {text}"
            name = out_dir.name if out_dir.name != "model" else type(model.model).__name__  # as export_text_model
            write_model_card(out_dir, model_name=name, summary=description,
                             config=to_dict(self.config), training_data=card["training_data"],
                             metrics={k: v for k, v in summary.items() if isinstance(v, int | float)},
                             pipeline_tag="text-generation", usage=card["usage"].format(path=out_dir))
        return out_dir


def generate_sample(model_dir: str | Path, sample: SampleConfig, seed: int = 0) -> str:
    """Text from stock `pipeline("text-generation")` on an exported folder (no code of ours involved)."""
    generate = pipeline("text-generation", model=str(model_dir), device="cpu")
    with torch.random.fork_rng(devices=[]):  # seeded, without moving the caller's RNG
        torch.manual_seed(seed)
        out = generate(sample.prompt, max_new_tokens=sample.max_new_tokens, do_sample=True, top_k=sample.top_k)
    return out[0]["generated_text"]
