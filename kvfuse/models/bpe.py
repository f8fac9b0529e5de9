"""The tiny test models' tokenizer: a deterministic byte-level BPE trained in code on a small fixed corpus."""
from __future__ import annotations

from functools import lru_cache

from transformers import PreTrainedTokenizerFast

from kvfuse.models.tiny import TINY_CONFIGS, TINY_VOCAB

# A fixed corpus: byte-level BPE covers any text through its 256-byte alphabet, and the merges learnt here make
# English, numbers and arithmetic tokenize into a few pieces per word, like a real tokenizer does.
_TINY_CORPUS = """\
Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her friends
every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck egg.
How much in dollars does she make every day at the farmers' market? She makes 9 * 2 = $18 every day.
A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?
It takes 2/2 = 1 bolt of white fiber, so the total amount of fabric is 2 + 1 = 3 bolts of fabric.
Josh buys a house for $80,000 and then puts in $50,000 in repairs. The cost came out to 130,000.
James decides to run 3 sprints 3 times a week. He runs 60 meters each sprint, so 540 meters a week.
Think step by step. First, find the number of apples. Then subtract the ones that were eaten.
The answer is 42. The total is 100 - 25 = 75. Each of the 12 students gets 5 pencils, so 12 * 5 = 60.
Solve the problem and give the final answer. Question: What is 7 + 8? Answer: 7 + 8 = 15.
To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer
the slings and arrows of outrageous fortune, or to take arms against a sea of troubles.
Now is the winter of our discontent made glorious summer by this sun of York.
Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.
All the world's a stage, and all the men and women merely players; they have their exits and their entrances.
If music be the food of love, play on. What's in a name? That which we call a rose would smell as sweet.
The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 50 75 100
"""
TINY_SPECIAL_TOKENS = ("<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")
# ChatML-style, as SmolLM2 and Qwen2 use; tiny-gemma3 gets none, like the packaged Gemma3 base model.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
_TINY_WITH_CHAT_TEMPLATE = {"tiny-llama", "tiny-qwen2"}


@lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False: offsets keep the leading space, as the packaged models' tokenizers report them.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=list(TINY_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_TINY_CORPUS.splitlines(), trainer)
    return tok.to_str()


def tiny_tokenizer(name: str = "tiny-llama") -> PreTrainedTokenizerFast:
    """The deterministic byte-level BPE tokenizer (vocab ≤ TINY_VOCAB) shared by the tiny test models; a fresh
    object on every call, so callers may modify it."""
    if name not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {sorted(TINY_CONFIGS)}")
    from tokenizers import Tokenizer

    pad, eos, _, _ = TINY_SPECIAL_TOKENS
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
                                        bos_token=eos, eos_token=eos, pad_token=pad, name_or_path=name)
    tokenizer.chat_template = TINY_CHAT_TEMPLATE if name in _TINY_WITH_CHAT_TEMPLATE else None
    return tokenizer
