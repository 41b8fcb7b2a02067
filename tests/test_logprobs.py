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
