"""A tiny random Llama with a character-level tokenizer, for tests that must not download.

Everything is built in memory from a fixed seed (no hub access): ``make_tiny_lm`` returns a
``(model, tokenizer)`` pair and ``save_tiny_lm`` writes one with ``save_pretrained`` so it can be
loaded back with ``AutoModelForCausalLM`` / ``AutoTokenizer`` from a local directory.

The tokenizer maps every printable ASCII character (plus ``\\n`` and ``\\t``) to one token and
has ``<pad>``, ``<s>``, ``</s>`` and ``<unk>`` specials, so any English prompt round-trips and
lm-eval never has to add a pad token (which would grow the vocabulary past the embedding).
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
CHARS = "".join(sorted(set(string.printable) - set("\r\x0b\x0c")))


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer: one token per character, BOS prepended on encode."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARS:
        vocab[ch] = len(vocab)
    # BPE with no merges and no pre-tokenizer splits any string into single characters.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
    )


def make_tiny_llama(
    vocab_size: int,
    *,
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    max_position_embeddings: int = 512,
    dtype: torch.dtype = torch.float32,
) -> LlamaForCausalLM:
    """A randomly initialised ``LlamaForCausalLM``; the same seed gives the same weights."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def make_tiny_lm(
    *, seed: int = 0, dtype: torch.dtype = torch.float32, **model_kwargs
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """``(model, tokenizer)``: a tiny random Llama sized to the char tokenizer's vocabulary."""
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_llama(len(tokenizer), seed=seed, dtype=dtype, **model_kwargs)
    return model, tokenizer


def save_tiny_lm(path: str | Path, *, seed: int = 0, **kwargs) -> Path:
    """Write a tiny model + tokenizer to ``path`` (``save_pretrained``) and return the path."""
    path = Path(path)
    model, tokenizer = make_tiny_lm(seed=seed, **kwargs)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --------------------------------------------------------------------------- tiny lm-eval tasks

TINY_MC_DOCS = (
    {"question": "What color is the sky?", "choices": ["blue", "green", "red"], "label": 0},
    {"question": "What is 2 + 2?", "choices": ["3", "4", "5"], "label": 1},
    {"question": "What is the opposite of hot?", "choices": ["cold", "warm"], "label": 0},
    {"question": "Which one is an animal?", "choices": ["rock", "chair", "dog"], "label": 2},
)
TINY_GEN_DOCS = (
    {"question": "1 + 1", "answer": "2"},
    {"question": "2 + 3", "answer": "5"},
    {"question": "4 + 4", "answer": "8"},
)

_MC_YAML = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

# Same data through `include:` (resolved relative to this YAML's directory) with another prompt.
_MC_ALT_YAML = """\
include: tiny_mc.yaml
task: tiny_mc_alt
tag: tiny_mc_tag
doc_to_text: "{{{{question}}}}"
"""

_GEN_YAML = """\
task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 5
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
filter_list:
  - name: strict-match
    filter:
      - function: regex
        regex_pattern: "(\\\\d+)"
      - function: take_first
  - name: none
    filter:
      - function: take_first
metadata:
  version: 1.0
"""

_GROUP_YAML = """\
group: tiny_group
task:
  - tiny_mc
  - tiny_mc_alt
aggregate_metric_list:
  - metric: acc
    aggregation: mean
    weight_by_size: true
metadata:
  version: 1.0
"""


def write_tiny_tasks(directory: str | Path) -> Path:
    """Write tiny local lm-eval tasks into ``directory`` (pass it as ``include_path``).

    Defines ``tiny_mc`` (multiple_choice, acc + acc_norm, 4 docs), ``tiny_mc_alt`` (same docs,
    other prompt, tag ``tiny_mc_tag``), ``tiny_gen`` (generate_until, exact_match under
    filters ``strict-match`` then ``none``, 3 docs) and group ``tiny_group`` (tiny_mc +
    tiny_mc_alt, mean acc).

    lm-eval hands ``dataset_kwargs.data_files`` to ``datasets.load_dataset`` unchanged, so a
    relative data path resolves against the *working directory*, not the YAML's directory;
    the YAML written here therefore uses absolute paths (and keeps the datasets cache in
    ``directory`` too).
    """
    import json

    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    cache = directory / ".hf_datasets_cache"
    for name, docs in (("tiny_mc", TINY_MC_DOCS), ("tiny_gen", TINY_GEN_DOCS)):
        lines = "".join(json.dumps(doc) + "\n" for doc in docs)
        (directory / f"{name}.jsonl").write_text(lines, encoding="utf-8")
    (directory / "tiny_mc.yaml").write_text(
        _MC_YAML.format(
            data=json.dumps(str(directory / "tiny_mc.jsonl")), cache=json.dumps(str(cache))
        )
    )
    (directory / "tiny_mc_alt.yaml").write_text(_MC_ALT_YAML.format())
    (directory / "tiny_gen.yaml").write_text(
        _GEN_YAML.format(
            data=json.dumps(str(directory / "tiny_gen.jsonl")), cache=json.dumps(str(cache))
        )
    )
    (directory / "tiny_group.yaml").write_text(_GROUP_YAML)
    return directory
