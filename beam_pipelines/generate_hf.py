"""``--engine transformers``: the generation model handler around ``model.generate``.

``model.generate(do_sample=True, num_return_sequences=N, output_logits=True)``, one call per
prompt so that each prompt's samples depend only on its own seed (``torch.manual_seed`` inside a
forked RNG state); sft_logp from the raw ``logits`` with ``rso.logprobs.gather_logps``. Loading
is the shared :mod:`rso.hf`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from beam_pipelines.elements import Candidate, PromptCandidates, RenderedPrompt
from beam_pipelines.generate import (
    SEED_STREAM,
    GenerationHandler,
    eos_token_ids,
    response_text,
    truncate_at_eos,
    warn_if_not_pi_sft,
)
from beam_pipelines.handlers import Loaded, set_torch_threads
from beam_pipelines.render import context_length, new_token_budget
from beam_pipelines.seeding import prompt_seed
from rso import cost


@contextlib.contextmanager
def seeded(seed: int, device: Any):
    """Runs the block with torch's RNG (CPU, and ``device`` if CUDA) seeded by ``seed``, and
    restores the previous RNG state afterwards."""
    import torch

    devices = [device] if getattr(device, "type", "cpu") == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class TransformersGenerationHandler(GenerationHandler):
    """ModelHandler[RenderedPrompt, PromptCandidates | Failure] around ``model.generate``.

    One ``generate`` call per prompt (N sequences in one batch), seeded per prompt; slower than
    vLLM, but needs only transformers. Precision: ``config.generation_dtype``.
    """

    batched = False

    def load_model(self) -> Loaded:
        from transformers import GenerationConfig

        set_torch_threads(self._config.torch_threads)
        from rso import hf

        warn_if_not_pi_sft(self._config)
        c = self._config
        tokenizer = hf.load_tokenizer(c.policy, c.trust_remote_code)
        model = hf.load_causal_lm(c.policy, c.generation_dtype, None, c.trust_remote_code)
        eos = eos_token_ids(tokenizer, model.generation_config)
        if not eos:
            raise ValueError(f"{c.policy}: neither the tokenizer nor the generation config has "
                             f"an EOS token")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
        # generate() fills unset options from the model's generation config (a checkpoint may
        # set repetition_penalty, min_new_tokens...): replace it so only our options apply.
        model.generation_config = GenerationConfig(eos_token_id=sorted(eos), pad_token_id=pad)
        return Loaded(model=model, tokenizer=tokenizer, eos=eos, pad=pad,
                      max_model_len=context_length(c.policy, c.max_model_len,
                                                   c.trust_remote_code))

    def infer(self, prompts: Sequence[RenderedPrompt], model: Loaded
              ) -> list[PromptCandidates]:
        return [self._generate_one(p, model) for p in prompts]

    def _generate_one(self, prompt: RenderedPrompt, m: Loaded) -> PromptCandidates:
        import torch
        from transformers import GenerationConfig

        from rso.logprobs import gather_logps

        c = self._config
        budget = new_token_budget(len(prompt.prompt_token_ids), c.max_new_tokens,
                                  m.max_model_len)
        if budget < 1:
            raise ValueError(f"prompt of {len(prompt.prompt_token_ids)} tokens leaves no room "
                             f"in a context of {m.max_model_len}")
        # top_k=0 explicitly: unset, generate() would apply its global default of 50.
        gen = GenerationConfig(do_sample=True, temperature=c.temperature, top_p=c.top_p,
                               top_k=c.top_k, max_new_tokens=budget,
                               num_return_sequences=c.num_candidates, eos_token_id=sorted(m.eos),
                               pad_token_id=m.pad, output_logits=True,
                               return_dict_in_generate=True)
        device = next(m.model.parameters()).device
        input_ids = torch.tensor([prompt.prompt_token_ids], dtype=torch.long, device=device)
        with torch.inference_mode(), seeded(prompt_seed(c.seed, prompt.prompt_id, SEED_STREAM),
                                            device):
            out = m.model.generate(input_ids=input_ids,
                                   attention_mask=torch.ones_like(input_ids),
                                   generation_config=gen)
        generated = out.sequences[:, input_ids.shape[1]:]  # [N, T]
        logits = torch.stack(out.logits, dim=1)  # [N, T, V], raw (before any processor)
        kept = [truncate_at_eos(row.tolist(), m.eos) for row in generated]
        mask = torch.zeros(generated.shape, dtype=torch.float32, device=device)
        for i, (ids, _) in enumerate(kept):
            mask[i, :len(ids)] = 1.0
        logps = gather_logps(logits, generated, mask).tolist()
        cost.record(calls=1, sequences=len(kept), tokens_in=len(prompt.prompt_token_ids),
                    tokens_out=sum(len(ids) for ids, _ in kept))
        return PromptCandidates(prompt, [
            Candidate(text=response_text(m.tokenizer, prompt.prompt_token_ids, ids),
                      token_ids=ids, finish_reason=finish, sft_logp=float(lp))
            for (ids, finish), lp in zip(kept, logps)])
