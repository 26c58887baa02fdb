"""The speed paths of the bert_mlm objective compute what the plain model computes.

`MaskedPositionsHead` runs the vocab head and the whole last layer only at masked positions;
`MaskedLMObjective.build_optimizer` uses fused AdamW. Each is checked against the obvious
reference: the full `BertForMaskedLM` encoder indexed afterwards, and the unfused AdamW step.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM
from transformers.models.bert.modeling_bert import BertLayer

from sslcore.objective import Objective
from sslcore.run_config import TrainConfig
from textssl.masking import IGNORE_INDEX
from textssl.mlm import MaskedLMObjective, MaskedPositionsHead, MLMConfig, bert_layer_at


def tiny_bert(seed=0, dropout=0.0, attention_dropout=0.0, layers=2):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, type_vocab_size=2,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=attention_dropout)
    return BertForMaskedLM(config)


def batch_with_uneven_masks(seed=0, batch=4, length=12):
    """Rows with 3, 1, 0 and all-but-one labelled positions: padding of queries is exercised."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 50, (batch, length), generator=gen)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, positions in enumerate([[1, 5, 9], [4], [], list(range(1, length))]):
        labels[row, positions] = input_ids[row, positions]
    return input_ids, labels


def reference(model, input_ids, labels):
    """The obvious way: full encoder, then index the masked positions."""
    hidden = model.bert(input_ids=input_ids).last_hidden_state
    selected = labels != IGNORE_INDEX
    return model.cls(hidden[selected]), labels[selected]


@pytest.mark.parametrize("layers", [1, 2])
def test_pruned_last_layer_matches_the_full_model_outputs_and_gradients(layers):
    full = tiny_bert(layers=layers)
    head = MaskedPositionsHead(copy.deepcopy(full))
    assert head.prunes_last_layer
    input_ids, labels = batch_with_uneven_masks()

    expected_logits, expected_targets = reference(full, input_ids, labels)
    logits, targets = head(input_ids=input_ids, labels=labels)
    assert torch.equal(targets, expected_targets)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)

    F.cross_entropy(expected_logits, expected_targets).backward()
    F.cross_entropy(logits, targets).backward()
    for (name, p_full), p_head in zip(full.named_parameters(), head.model.parameters()):
        assert (p_full.grad is None) == (p_head.grad is None), name
        if p_full.grad is not None:  # key biases get ~1e-12 (exactly 0 in exact arithmetic)
            torch.testing.assert_close(p_head.grad, p_full.grad, rtol=1e-4, atol=1e-8, msg=name)


def test_bert_layer_at_is_the_layer_output_at_selected_positions():
    model = tiny_bert(seed=1).eval()
    hidden = torch.randn(3, 10, 16)
    selected = torch.zeros(3, 10, dtype=torch.bool)
    selected[0, [0, 9]] = True
    selected[2, 3:7] = True
    layer = model.bert.encoder.layer[0]
    torch.testing.assert_close(bert_layer_at(layer, hidden, selected), layer(hidden, None)[selected],
                               rtol=1e-5, atol=1e-5)


def test_pruned_last_layer_keeps_attention_dropout_in_training():
    head = MaskedPositionsHead(tiny_bert(attention_dropout=0.5, layers=1))
    input_ids, labels = batch_with_uneven_masks()
    head.eval()
    with torch.no_grad():
        deterministic, _ = head(input_ids=input_ids, labels=labels)
        again, _ = head(input_ids=input_ids, labels=labels)
        head.train()
        torch.manual_seed(0)
        dropped, _ = head(input_ids=input_ids, labels=labels)
    assert torch.equal(deterministic, again)
    assert not torch.allclose(dropped, deterministic)


def test_padded_batches_and_batches_without_masks_take_the_full_path():
    full = tiny_bert(seed=2)
    head = MaskedPositionsHead(copy.deepcopy(full)).eval()
    input_ids, labels = batch_with_uneven_masks(seed=3)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[:, -3:] = 0
    labels[:, -3:] = IGNORE_INDEX
    logits, _ = head(input_ids=input_ids, labels=labels, attention_mask=attention_mask)
    hidden = full.eval().bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    torch.testing.assert_close(logits, full.cls(hidden[labels != IGNORE_INDEX]), rtol=1e-5, atol=1e-5)

    nothing = torch.full_like(labels, IGNORE_INDEX)
    logits, targets = head(input_ids=input_ids, labels=nothing)
    assert logits.shape == (0, 50) and targets.numel() == 0


def test_fused_adamw_steps_like_the_default_unfused_one():
    objective = MaskedLMObjective(MLMConfig())
    args = TrainConfig(learning_rate=1e-2, weight_decay=0.1)
    models = [MaskedPositionsHead(tiny_bert(seed=4)) for _ in range(2)]
    fused = objective.build_optimizer(models[0], args)
    plain = Objective.build_optimizer(objective, models[1], args)
    assert all(group["fused"] for group in fused.param_groups)
    assert [g["weight_decay"] for g in fused.param_groups] == [g["weight_decay"] for g in plain.param_groups]
    input_ids, labels = batch_with_uneven_masks(seed=5)
    for _ in range(3):
        for model, optimizer in zip(models, [fused, plain]):
            logits, targets = model(input_ids=input_ids, labels=labels)
            F.cross_entropy(logits, targets).backward()
            optimizer.step()
            optimizer.zero_grad()
    for p_fused, p_plain in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p_fused, p_plain, rtol=1e-5, atol=1e-6)


def test_a_wrapped_last_layer_takes_the_full_path(monkeypatch):
    """FSDP swaps the layer's class and gathers its shards only in its own forward: no cut then."""
    full = tiny_bert(seed=6).eval()
    head = MaskedPositionsHead(copy.deepcopy(full)).eval()
    head.model.bert.encoder.layer[-1].__class__ = type("FSDPBertLayer", (BertLayer,), {})

    def must_not_run(*args):
        raise AssertionError("the last-layer cut ran on a wrapped layer")

    monkeypatch.setattr("textssl.mlm.bert_layer_at", must_not_run)
    input_ids, labels = batch_with_uneven_masks(seed=7)
    logits, targets = head(input_ids=input_ids, labels=labels)
    expected_logits, expected_targets = reference(full, input_ids, labels)
    assert torch.equal(targets, expected_targets)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
