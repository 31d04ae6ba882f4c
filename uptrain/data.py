"""Training text as fixed-length token blocks, read in an order that is a pure function of (seed, position).

Because the block at global position p never depends on what ran before, a resumed run reads exactly the
blocks the interrupted run would have read, and every process can find its share without a sampler.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from kvshrink.convert.corpora import corpus_text
from kvshrink.convert.errors import KvshrinkError
from kvshrink.uptrain.recipe import DataSource, Recipe, data_files

Split = Literal["train", "heldout"]


@dataclass(frozen=True)
class Blocks:
    """Token blocks of one length; `lengths` counts the real tokens of each (the rest is padding)."""

    tokens: torch.Tensor  # [N, seq_len] int32
    lengths: torch.Tensor  # [N] int64

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) for the blocks at `indices`."""
        ids = self.tokens[indices].long()
        mask = torch.arange(ids.shape[1]) < self.lengths[indices, None]
        return ids, mask.long()


def documents(source: DataSource, split: Split) -> Iterator[str]:
    """The texts of one source; a corpus gives its `split`, other sources are used whole."""
    if source.corpus is not None:
        yield corpus_text(source.corpus, split)
    elif source.path is not None:
        for path in data_files(source.path):
            yield from _file_documents(path, source.text_field)
    else:
        yield from _streamed_documents(source)


def _file_documents(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".txt":
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise KvshrinkError(f"{path} is not UTF-8 text: re-encode it as UTF-8") from None
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    yield _text_field(_json_line(line, path, number), text_field, f"{path}:{number}")
    else:
        import pyarrow.parquet

        table = pyarrow.parquet.read_table(path)
        if text_field not in table.column_names:
            raise KvshrinkError(
                f"{path} has no column {text_field!r} (it has {', '.join(table.column_names)}): set text_field"
            )
        yield from (text for text in table.column(text_field).to_pylist() if text)


def _json_line(line: str, path: Path, number: int) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        raise KvshrinkError(f"{path}:{number} is not valid JSON: fix the line") from None
    if not isinstance(row, dict):
        raise KvshrinkError(f"{path}:{number} is not a JSON object: write one object per line")
    return row


def _text_field(row: dict, text_field: str, where: str) -> str:
    text = row.get(text_field)
    if not isinstance(text, str):
        raise KvshrinkError(f"{where} has no text field {text_field!r}: fix the data or set text_field")
    return text


def _streamed_documents(source: DataSource) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise KvshrinkError("hf data sources need the `datasets` package: pip install datasets") from None
    try:
        stream = datasets.load_dataset(
            source.hf, source.config, split=source.split, data_files=source.data_files, streaming=True
        )
    except Exception as error:  # datasets raises many types for a name it cannot resolve
        raise KvshrinkError(
            f"could not open dataset {source.describe()} ({type(error).__name__}: {error}): "
            "check the name, config and split, and that this machine can reach the hub"
        ) from None
    for number, row in enumerate(stream):
        yield _text_field(row, source.text_field, f"{source.describe()} row {number}")


def token_blocks(texts: Iterable[str], tokenizer, seq_len: int, packing: bool) -> Iterator[tuple[list[int], int]]:
    """(block tokens, real length) pairs. Packing joins documents with EOS and yields full blocks only;
    without packing each block stays inside one document and the last one is padded."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if eos is None:
        raise KvshrinkError("the model's tokenizer has no EOS token: add eos_token to its tokenizer_config.json")
    buffer: list[int] = []
    for text in texts:
        ids = tokenizer(text, verbose=False)["input_ids"] + [eos]
        if packing:
            buffer.extend(ids)
            while len(buffer) >= seq_len:
                yield buffer[:seq_len], seq_len
                del buffer[:seq_len]
        else:
            for start in range(0, len(ids), seq_len):
                chunk = ids[start : start + seq_len]
                if len(chunk) > 1:  # a lone token has no next token to predict
                    yield chunk + [pad] * (seq_len - len(chunk)), len(chunk)


def collect_blocks(pairs: Iterable[tuple[list[int], int]], seq_len: int) -> Blocks:
    pairs = list(pairs)
    tokens = torch.tensor([block for block, _ in pairs], dtype=torch.int32).reshape(len(pairs), seq_len)
    lengths = torch.tensor([length for _, length in pairs], dtype=torch.long)
    return Blocks(tokens, lengths)


class TrainingStream:
    """Global sequence of training blocks. Local text is shuffled once per epoch with a generator seeded by
    (seed, epoch); a streamed HF dataset is read in its own order and re-opened at its end."""

    def __init__(self, recipe: Recipe, tokenizer, blocks: Blocks | None):
        self.recipe = recipe
        self.tokenizer = tokenizer
        self.blocks = blocks

    def blocks_from(self, position: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(input_ids [seq_len], attention_mask [seq_len]) for global positions position, position + 1, ..."""
        if self.blocks is not None:
            count = len(self.blocks)
            epoch, order = -1, None
            for index in itertools.count(position):
                if index // count != epoch:
                    epoch = index // count
                    generator = torch.Generator().manual_seed(self.recipe.seed * 1_000_003 + epoch)
                    order = torch.randperm(count, generator=generator)
                ids, mask = self.blocks.batch([int(order[index % count])])
                yield ids[0], mask[0]
        else:
            for block, length in itertools.islice(self._streamed_epochs(), position, None):
                ids = torch.tensor(block, dtype=torch.long)
                yield ids, (torch.arange(len(block)) < length).long()

    def _streamed_epochs(self) -> Iterator[tuple[list[int], int]]:
        while True:
            texts = itertools.chain.from_iterable(documents(s, "train") for s in self.recipe.data)
            empty = True
            for pair in token_blocks(texts, self.tokenizer, self.recipe.seq_len, self.recipe.packing):
                empty = False
                yield pair
            if empty:
                raise KvshrinkError(
                    f"the training data holds less than one {self.recipe.seq_len}-token block: "
                    "add text or lower seq_len"
                )


def build_data(recipe: Recipe, tokenizer) -> tuple[TrainingStream, Blocks]:
    """The training stream and the validation blocks a recipe describes."""
    streamed = any(source.hf for source in recipe.data)
    training: Blocks | None = None
    if not streamed:
        texts = itertools.chain.from_iterable(documents(s, "train") for s in recipe.data)
        training = collect_blocks(token_blocks(texts, tokenizer, recipe.seq_len, recipe.packing), recipe.seq_len)
    validation_sources = recipe.validation.sources
    if not validation_sources and recipe.validation.fraction == 0:
        validation_sources = [s for s in recipe.data if s.corpus]
    max_blocks = max(1, recipe.validation.max_tokens // recipe.seq_len)
    if validation_sources:
        texts = itertools.chain.from_iterable(documents(s, "heldout") for s in validation_sources)
        pairs = token_blocks(texts, tokenizer, recipe.seq_len, packing=True)
        validation = collect_blocks(itertools.islice(pairs, max_blocks), recipe.seq_len)
    else:
        held = min(max_blocks, max(1, round(len(training) * recipe.validation.fraction)))
        validation = Blocks(training.tokens[-held:], training.lengths[-held:])
        training = Blocks(training.tokens[:-held], training.lengths[:-held])
    if training is not None and len(training) == 0:
        raise KvshrinkError(
            f"the training data holds less than one {recipe.seq_len}-token block: add text or lower seq_len"
        )
    if len(validation) == 0:
        raise KvshrinkError(
            f"the validation text holds less than one {recipe.seq_len}-token block: add text or lower seq_len"
        )
    return TrainingStream(recipe, tokenizer, training), validation
