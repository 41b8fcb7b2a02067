"""rso.logprobs: response log-prob sums, the one implementation of the project."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from rso import logprobs as L

PROMPTS = [[4, 25, 24, 19, 29, 69, 11, 5], [4, 30, 5], [7, 8]]
RESPONSES = [[185, 79, 169, 111], [90, 168, 217, 117, 176, 186, 3], []]


def _unpadded(model, prompt, response) -> float:
    """log pi(response | prompt) from one full forward of the single unpadded sequence."""
    logp = torch.log_softmax(model(torch.tensor([prompt + response])).logits.float(), -1)[0]
    return sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(response))


@pytest.fixture(scope="module")
def model(tiny_policy):
    return AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32).eval()


def test_left_padded_batch_equals_unpadded_forwards(model):
    with torch.no_grad():
        got = L.sequence_logps(model, PROMPTS, RESPONSES, pad_id=1)
    expected = [_unpadded(model, p, r) for p, r in zip(PROMPTS, RESPONSES)]
    assert got.tolist() == pytest.approx(expected, abs=1e-4)
    assert got[2].item() == 0.0  # an empty response has log-prob 0


def test_chunked_head_matches_full_logits_in_value_and_gradient(model, monkeypatch):
    assert L._fused_head(model) is not None  # Llama takes the chunked path
    batch = L.pack(PROMPTS, RESPONSES, pad_id=1)
    monkeypatch.setattr(L, "CHUNK_ROWS", 3)  # several chunks, one partial

    def run():
        model.zero_grad()
        out = L.forward_logps(model, batch)
        (out * torch.tensor([1.0, -2.0, 1.0])).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    fused, fused_grads = run()
    monkeypatch.setattr(L, "_fused_head", lambda m: None)  # the model's own full logits
    full, full_grads = run()
    assert torch.allclose(fused, full, atol=1e-4)
    for name, g in full_grads.items():
        assert torch.allclose(fused_grads[name], g, atol=1e-5), name
    model.zero_grad()


def test_gather_logps_is_log_softmax_at_the_labels():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[1, 1, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.float32)
    ref = (torch.log_softmax(logits, -1).gather(2, labels[..., None]).squeeze(-1) * mask).sum(-1)
    assert torch.allclose(L.gather_logps(logits, labels, mask), ref, atol=1e-6)


SHARED_PROMPT = [4, 25, 24, 19, 29, 69, 11, 5]
SHARED_RESPONSES = [[185, 79, 169, 111], [90, 168, 217, 117, 176, 186, 3], [], [42],
                    [90, 168], [185, 79, 169, 111]]


@pytest.mark.parametrize("fused", [True, False], ids=["fused-head", "model-logits"])
@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_shared_prompt_equals_full_sequences(model, monkeypatch, fused, batch_size):
    """Encoding the prompt once and running the responses on its cache gives the trainer's
    values: the same sums as full unpadded forwards, for empty, one-token and repeated
    responses, whatever the chunking; and the same bits for the same batch_size."""
    if not fused:
        monkeypatch.setattr(L, "_fused_head", lambda m: None)
    with torch.no_grad():
        got = L.shared_prompt_logps(model, SHARED_PROMPT, SHARED_RESPONSES, 1, batch_size)
        again = L.shared_prompt_logps(model, SHARED_PROMPT, SHARED_RESPONSES[::-1], 1,
                                      batch_size).flip(0)
    expected = [_unpadded(model, SHARED_PROMPT, r) for r in SHARED_RESPONSES]
    assert got.dtype == torch.float32 and got.shape == (len(SHARED_RESPONSES),)
    assert got.tolist() == pytest.approx(expected, abs=1e-4)
    assert got[2].item() == 0.0 and got[0].item() == got[5].item()
    assert torch.equal(got, again)  # order of the responses does not change any value


def test_shared_prompt_values_do_not_depend_on_the_order_of_the_responses(model):
    """Equal-length responses in a chunk are ordered by their ids, not their position: any
    permutation gives the same bits."""
    import random

    rng = random.Random(0)
    responses = [[rng.randrange(3, 200) for _ in range(n)] for n in (1, 2, 2, 2, 3, 3, 5, 5)]
    with torch.no_grad():
        first = L.shared_prompt_logps(model, SHARED_PROMPT, responses, 1, 3)
        for _ in range(8):
            order = list(range(len(responses)))
            rng.shuffle(order)
            got = L.shared_prompt_logps(model, SHARED_PROMPT, [responses[j] for j in order], 1,
                                        3)
            assert torch.equal(got, first[order])


@pytest.mark.parametrize("model_type,extra", [
    ("lfm2", {"layer_types": ["conv", "full_attention"], "conv_L_cache": 3}),
    ("mamba", {"state_size": 4, "expand": 2, "conv_kernel": 4}),
], ids=["hybrid-lfm2", "recurrent-mamba"])
def test_shared_prompt_on_models_whose_cache_cannot_be_repeated(model_type, extra):
    """Recurrent and hybrid layers have no batch_repeat_interleave: the prompt's responses are
    scored as full sequences instead, with the same values."""
    from transformers import AutoConfig

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=64,
                                  vocab_size=97, head_dim=8, **extra)
    tiny = AutoModelForCausalLM.from_config(config).eval()
    prompt, responses = [5, 6, 7, 8], [[9, 10, 11, 12, 13, 14], [15], []]
    with torch.no_grad():
        got = L.shared_prompt_logps(tiny, prompt, responses, 0, 2)
        expected = [_unpadded(tiny, prompt, r) if r else 0.0 for r in responses]
    assert got.tolist() == pytest.approx(expected, abs=1e-4)


def test_shared_prompt_refuses_what_it_cannot_score(model):
    with pytest.raises(ValueError, match="at least one token"):
        L.shared_prompt_logps(model, [], [[1, 2]], 1, 4)
    with pytest.raises(ValueError, match="batch_size"):
        L.shared_prompt_logps(model, [4], [[1, 2]], 1, 0)
    assert L.shared_prompt_logps(model, [4], [[], []], 1, 4).tolist() == [0.0, 0.0]
