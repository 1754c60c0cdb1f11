"""BERT and GPT-1 input transformations, truncation, heads and learning-rate groups."""

from __future__ import annotations

import pytest
import torch

from pipeline.finetune.heads import FinetuneModel, lm_labels_for, lr_scales
from pipeline.finetune.inputs import InputFormat, truncate_pair
from pipeline.model.config import load_model_preset
from pipeline.tokenizer.special import SPECIAL_IDS as S
from pipeline.train.engine import param_groups


def test_bert_single_and_pair():
    fmt = InputFormat("bert", 16)
    single = fmt.single([10, 11, 12])
    assert single.input_ids == [S.cls, 10, 11, 12, S.sep]
    assert single.token_type_ids == [0] * 5 and single.summary_index == 0 and not single.truncated
    pair = fmt.pair([10, 11], [20, 21, 22])
    assert pair.input_ids == [S.cls, 10, 11, S.sep, 20, 21, 22, S.sep]
    assert pair.token_type_ids == [0, 0, 0, 0, 1, 1, 1, 1]  # [CLS] A [SEP] are segment 0, B [SEP] segment 1
    assert pair.summary_index == 0


def test_gpt1_start_delim_extract():
    fmt = InputFormat("gpt", 16)
    single = fmt.single([10, 11, 12])
    assert single.input_ids == [S.start, 10, 11, 12, S.extract]
    assert single.summary_index == 4  # the head reads the extract token, the last one
    pair = fmt.pair([10, 11], [20])
    assert pair.input_ids == [S.start, 10, 11, S.delim, 20, S.extract]
    assert pair.token_type_ids == [0] * 6 and pair.summary_index == 5


def test_truncation_keeps_the_special_tokens_and_is_reported():
    fmt = InputFormat("gpt", 8)
    single = fmt.single(list(range(100, 120)))
    assert single.truncated and len(single.input_ids) == 8
    assert single.input_ids[0] == S.start and single.input_ids[-1] == S.extract and single.input_ids[1] == 100
    pair = InputFormat("bert", 10).pair(list(range(100, 110)), [200, 201])
    assert pair.truncated and len(pair.input_ids) == 10
    assert pair.input_ids[-3:] == [200, 201, S.sep]  # the longer part loses tokens from its end first
    a, b, cut = truncate_pair([1, 2, 3, 4], [5, 6, 7, 8], 5)
    assert (a, b, cut) == ([1, 2, 3], [5, 6], True)


def _model(arch: str, head: str, num_labels: int = 3) -> FinetuneModel:
    cfg = load_model_preset("debug", {"vocab_size": 300, "arch": arch})
    torch.manual_seed(0)
    return FinetuneModel(cfg, head, num_labels).eval()


def test_heads_read_cls_or_extract_and_mask_padding():
    ids = torch.tensor([[S.start, 20, 21, S.extract, 0, 0], [S.start, 22, S.extract, 0, 0, 0]])
    mask = (ids != 0).long()
    summary = torch.tensor([3, 2])
    gpt = _model("gpt", "classify")
    logits = gpt(ids, attention_mask=mask, summary_index=summary).logits
    assert logits.shape == (2, 3)
    # The extract token's state depends only on the real tokens: padding more changes nothing.
    alone = gpt(ids[1:, :3], attention_mask=mask[1:, :3], summary_index=summary[1:]).logits
    torch.testing.assert_close(logits[1:], alone, atol=1e-5, rtol=1e-5)
    choice = _model("bert", "choice")
    ids3 = torch.randint(10, 300, (2, 3, 7))
    out = choice(ids3, attention_mask=torch.ones_like(ids3), choice_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))
    assert out.logits.shape == (2, 3) and out.logits[1, 2] < -1e30  # a padded choice never wins the softmax
    span = _model("bert", "span")
    out = span(ids, attention_mask=mask)
    assert out.logits.shape == (2, 6, 2) and bool((out.logits[0, 4:] < -1e30).all())


def test_gpt1_auxiliary_lm_targets_are_the_next_real_tokens():
    ids = torch.tensor([[S.start, 20, 21, S.extract, 0]])
    labels = lm_labels_for(ids, (ids != 0).long())
    assert labels.tolist() == [[20, 21, S.extract, -100, -100]]
    out = _model("gpt", "classify")(ids, attention_mask=(ids != 0).long(), summary_index=torch.tensor([3]),
                                    lm_labels=labels)  # fmt: skip
    assert int(out.lm.count) == 3 and torch.isfinite(out.lm.loss)


def test_new_head_loads_a_pretrained_body_and_gets_its_own_learning_rate():
    from pipeline.model.builder import build_model

    cfg = load_model_preset("debug", {"vocab_size": 300})
    pretrained = build_model(cfg)
    model = FinetuneModel(cfg, "classify", 2)
    left = model.load_pretrained(pretrained.state_dict())
    assert sorted(left) == ["head.bias", "head.weight"]
    torch.testing.assert_close(model.pooler.dense.weight, pretrained.pooler.dense.weight)
    scales = lr_scales(cfg.num_layers, 0.5, 0.8)
    groups = param_groups(model, 0.01, scales)
    by_scale: dict[float, int] = {}
    for g in groups:
        by_scale[g["lr_scale"]] = by_scale.get(g["lr_scale"], 0) + sum(p.numel() for p in g["params"])
    assert by_scale[1.0] == model.head.weight.numel() + model.head.bias.numel()
    assert set(by_scale) == {1.0, 0.5, 0.5 * 0.8, 0.5 * 0.8**2}  # top layer + pooler, layer 0, embeddings


def test_mean_pooling_reads_the_real_tokens_only():
    from pipeline.finetune.heads import masked_mean
    from pipeline.model.builder import build_model

    hidden = torch.arange(12, dtype=torch.float32).view(1, 4, 3)
    torch.testing.assert_close(masked_mean(hidden, torch.tensor([[1, 1, 0, 0]])), hidden[:, :2].mean(1))
    for arch in ("bert", "gpt"):
        cfg = load_model_preset("debug", {"vocab_size": 300, "arch": arch})
        torch.manual_seed(0)
        model = FinetuneModel(cfg, "classify", 2, pooling="mean").eval()
        assert model.pooler is None  # BERT's pooler belongs to the [CLS] summary only
        left = model.load_pretrained(build_model(cfg).state_dict())
        assert sorted(left) == ["head.bias", "head.weight"]
        ids = torch.tensor([[S.start, 20, 21, 22, S.extract, 0, 0]])
        mask = (ids != 0).long()
        padded = model(ids, attention_mask=mask, summary_index=torch.tensor([4])).logits
        alone = model(ids[:, :5], attention_mask=mask[:, :5], summary_index=torch.tensor([4])).logits
        torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)  # padding takes no part in the mean
    with pytest.raises(ValueError, match="pooling"):
        FinetuneModel(cfg, "classify", 2, pooling="max")
