"""Tiny real Hugging Face models and tokenizers, built offline on the spot for the tests.

- a word-level tokenizer trained on a small corpus, with a chat template, eos/pad/bos tokens;
- a 2-layer Llama causal LM (the policy), saved as safetensors;
- a 2-layer Llama sequence-classification model with one output (a pointwise reward model);
- a 2-layer BERT encoder laid out as a sentence-transformers model that pools by mean.
Sizes are chosen so vLLM's CPU backend accepts them (head_dim 64).
"""
from __future__ import annotations

import os

CORPUS = """
Human: How do I bake bread? Assistant: Mix flour, water, salt and yeast, then knead and bake.
Human: What is the capital of France? Assistant: Paris is the capital of France.
Human: Tell me a joke. Assistant: Why did the chicken cross the road? To get to the other side.
Human: How can I stay safe online? Assistant: Use strong passwords and keep software updated.
Human: Can you help me with my homework? Assistant: Sure, what is the question about?
Human: What is two plus two? Assistant: Two plus two is four.
Human: Is it going to rain today? Assistant: I do not know, please check a weather service.
Human: Write a short poem about the sea. Assistant: The sea is wide, the sea is deep, it sings me gently off to sleep.
the a an of to and in is it you that he was for on are with as I his they be at one have this
from or had by hot word but what some we can out other were all there when up use your how said
each she which do their time if will way about many then them write would like so these her long
make thing see him two has look more day could go come did number sound no most people my over
know water than call first who may down side been now find any new work part take get place made
live where after back little only round man year came show every good me give our under name very
through just form sentence great think say help low line differ turn cause much mean before move
right boy old too same tell does set three want air well also play small end put home read hand
port large spell add even land here must big high such follow act why ask men change went light
kind off need house picture try us again animal point mother world near build self earth father
"""
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(out_dir: str):
    """A word-level fast tokenizer trained on CORPUS, saved to out_dir and returned."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIALS, min_frequency=1)
    tok.train_from_iterator(CORPUS.split("\n"), trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                 bos_token="<s>", eos_token="</s>")
    hf.chat_template = CHAT_TEMPLATE
    hf.model_max_length = 256
    hf.save_pretrained(out_dir)
    return hf


def _llama_config(tokenizer, **overrides):
    from transformers import LlamaConfig

    cfg = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
               max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, torch_dtype="float32")
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def build_policy(out_dir: str, seed: int = 0) -> str:
    """A 2-layer Llama causal LM with its tokenizer, saved (safetensors) to out_dir."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    os.makedirs(out_dir, exist_ok=True)
    tok = build_tokenizer(out_dir)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_llama_config(tok))
    # Make EOS likely enough that some samples stop before max_new_tokens.
    with torch.no_grad():
        model.lm_head.bias = None
        model.lm_head.weight[tok.eos_token_id] *= 0.0
        model.lm_head.weight[tok.eos_token_id] += model.model.norm.weight.mean() * 0.05
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id,
                                               eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_reward_model(out_dir: str, seed: int = 1) -> str:
    """A 2-layer Llama sequence classifier with one output (pointwise reward), saved to out_dir."""
    import torch
    from transformers import LlamaForSequenceClassification

    os.makedirs(out_dir, exist_ok=True)
    tok = build_tokenizer(out_dir)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(_llama_config(tok, num_labels=1))
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_sentence_encoder(out_dir: str, seed: int = 2) -> str:
    """A 2-layer BERT encoder (bare ``BertModel``, as sentence-transformers saves one) with the
    word-level tokenizer and a ``1_Pooling/config.json`` that selects mean pooling."""
    import json

    import torch
    from transformers import BertConfig, BertModel

    os.makedirs(os.path.join(out_dir, "1_Pooling"), exist_ok=True)
    tok = build_tokenizer(out_dir)
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=128,
                                 max_position_embeddings=256, pad_token_id=tok.pad_token_id))
    model.save_pretrained(out_dir, safe_serialization=True)
    with open(os.path.join(out_dir, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": 64, "pooling_mode_cls_token": False,
                   "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False}, f)
    return out_dir
