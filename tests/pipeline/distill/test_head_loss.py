"""The chunked head loss equals the full-logits losses, in value and in every gradient."""

from __future__ import annotations

import pytest
import torch

import pipeline.distill.head_loss as head_loss
from pipeline.distill.losses import ce_loss, kd_loss


def _models(tie: bool, bias: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(config)
    teacher = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    if bias:  # no Llama has one; the head loss still honours it
        for model in (student, teacher):
            model.lm_head.bias = torch.nn.Parameter(torch.randn(97) * 0.5, requires_grad=model is student)
    return student, teacher


def _full(student, teacher, ids, terms):
    """The reference: full logits through losses.py, gradients by autograd."""
    t_logits = teacher(input_ids=ids, use_cache=False).logits
    s_logits = student(input_ids=ids, use_cache=False).logits
    return terms.kd * kd_loss(s_logits, t_logits, terms.temperature) + terms.ce * ce_loss(s_logits, ids)


def _chunked(student, teacher, ids, terms):
    with head_loss.returning_hidden(teacher):
        t_final = teacher(input_ids=ids, use_cache=False).logits
    with head_loss.returning_loss(student, head_loss.next_token_targets(ids), terms, t_final, teacher.lm_head):
        total, kd, ce = student(input_ids=ids, use_cache=False).logits
    return total, kd, ce


@pytest.mark.parametrize("tie,bias", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize(
    "terms", [head_loss.Terms(kd=1.0, ce=0.5, temperature=2.0), head_loss.Terms(kd=1.0), head_loss.Terms(ce=1.0)]
)
def test_chunked_equals_full_logits_in_value_and_gradients(monkeypatch, tie, bias, terms):
    monkeypatch.setattr(head_loss, "CHUNK_ELEMENTS", 97 * 5)  # 5 positions a chunk: 3 rows x 7 tokens -> 5 chunks
    student, teacher = _models(tie, bias)
    ids = torch.randint(0, 97, (3, 7), generator=torch.Generator().manual_seed(1))

    reference = _full(student, teacher, ids, terms)
    (0.5 * reference).backward()  # scaled, as gradient accumulation scales the loss
    expected = {name: p.grad.clone() for name, p in student.named_parameters()}
    student.zero_grad()

    total, kd, ce = _chunked(student, teacher, ids, terms)
    (0.5 * total).backward()
    assert float(total) == pytest.approx(float(reference), rel=1e-5)
    assert float(terms.kd * kd + terms.ce * ce) == pytest.approx(float(reference), rel=1e-5)
    assert not kd.requires_grad and not ce.requires_grad
    for name, p in student.named_parameters():
        assert torch.allclose(p.grad, expected[name], rtol=1e-5, atol=1e-7), name
    assert student.lm_head.forward.__func__ is type(student.lm_head).forward  # the heads are restored


def test_the_terms_are_the_losses_and_no_gradient_is_formed_without_grad():
    student, teacher = _models(tie=True)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, kd, ce = _chunked(student, teacher, ids, head_loss.Terms(kd=1.0, ce=1.0, temperature=1.0))
        s_logits, t_logits = student(input_ids=ids).logits, teacher(input_ids=ids).logits
    assert float(kd) == pytest.approx(float(kd_loss(s_logits, t_logits, 1.0)), rel=1e-5)
    assert float(ce) == pytest.approx(float(ce_loss(s_logits, ids)), rel=1e-6)


def test_under_bf16_autocast_it_tracks_the_full_logits_losses():
    student, teacher = _models(tie=True)
    ids = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(3))
    terms = head_loss.Terms(kd=1.0, ce=0.5, temperature=2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = _full(student, teacher, ids, terms)
    reference.backward()
    expected = torch.cat([p.grad.flatten() for p in student.parameters()])
    student.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _, _ = _chunked(student, teacher, ids, terms)
    total.backward()
    got = torch.cat([p.grad.flatten() for p in student.parameters()])
    assert float(total) == pytest.approx(float(reference), rel=1e-3)  # the same bf16 logits, float32 softmaxes
    assert torch.nn.functional.cosine_similarity(got, expected, dim=0) > 0.999


def test_targets_skip_each_rows_last_position():
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert head_loss.next_token_targets(ids).tolist() == [2, 3, -100, 5, 6, -100]


def test_kd_without_the_teacher_is_refused():
    student, _ = _models(tie=True)
    with pytest.raises(ValueError, match="teacher's final hidden states"):
        with head_loss.returning_loss(student, torch.zeros(4, dtype=torch.long), head_loss.Terms(kd=1.0)):
            pass


def test_a_forward_set_on_the_head_by_a_hook_library_is_put_back():
    student, _ = _models(tie=True)
    hooked = student.lm_head.forward  # what accelerate's hooks do: a forward set on the instance

    def hook(x):
        return hooked(x)

    student.lm_head.forward = hook
    with head_loss.returning_hidden(student):
        assert student(input_ids=torch.tensor([[1, 2]])).logits.shape == (1, 2, 32)
    assert student.lm_head.forward is hook


def test_a_family_whose_logits_are_not_the_heads_output_is_refused():
    from transformers import AutoConfig

    from pipeline.errors import StageError

    head_loss.check_family(AutoConfig.for_model("qwen2"))
    with pytest.raises(StageError, match="model family 'gemma2' is not supported"):
        head_loss.check_family(AutoConfig.for_model("gemma2"))


def test_with_neither_term_the_head_adds_nothing():
    student, _ = _models(tie=True)
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(4))
    with head_loss.returning_loss(student, head_loss.next_token_targets(ids), head_loss.Terms()):
        total, kd, ce = student(input_ids=ids).logits
    total.backward()
    assert float(total) == float(kd) == float(ce) == 0.0
    assert all(p.grad is None or not p.grad.any() for p in student.parameters())
