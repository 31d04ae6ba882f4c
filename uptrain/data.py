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
from typing import Any, Literal

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


@dataclass(frozen=True)
class SourceShare:
    """Where one local source's blocks sit in the training Blocks, and how many draws a pass gives them."""

    source: str
    start: int
    count: int
    draws: int


def source_shares(sources: list[DataSource], sizes: list[int]) -> list[SourceShare]:
    """How many draws each source gets in a pass, which is as long as all the blocks together. Without weights
    every block is drawn once, so sources count in proportion to their size; with weights source i gets
    weight_i / sum(weights) of the pass, repeating a small source's blocks and leaving out part of a large one's."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    if all(source.weight is None for source in sources):
        draws = sizes
    else:
        weight_sum = sum(source.weight for source in sources)
        draws = [max(1, round(sum(sizes) * source.weight / weight_sum)) for source in sources]
    return [
        SourceShare(source.describe(), start, size, count)
        for source, start, size, count in zip(sources, starts, sizes, draws)
        if size
    ]


class TrainingStream:
    """Global sequence of training blocks. Local text is read in passes, each shuffled with a generator seeded by
    (seed, pass); a streamed HF dataset is read in its own order and re-opened at its end."""

    def __init__(self, recipe: Recipe, tokenizer, blocks: Blocks | None, shares: list[SourceShare]):
        self.recipe = recipe
        self.tokenizer = tokenizer
        self.blocks = blocks
        self.shares = shares

    @property
    def pass_length(self) -> int:
        """Blocks drawn in one pass over local data: every source's draws."""
        return sum(share.draws for share in self.shares)

    def blocks_from(self, position: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(input_ids [seq_len], attention_mask [seq_len]) for global positions position, position + 1, ..."""
        if self.blocks is not None:
            length = self.pass_length
            epoch, order = -1, None
            for index in itertools.count(position):
                if index // length != epoch:
                    epoch = index // length
                    order = self._pass_order(epoch)
                ids, mask = self.blocks.batch([int(order[index % length])])
                yield ids[0], mask[0]
        else:
            for block, length in itertools.islice(self._streamed_epochs(), position, None):
                ids = torch.tensor(block, dtype=torch.long)
                yield ids, (torch.arange(len(block)) < length).long()

    def mix(self) -> list[dict[str, Any]] | None:
        """Each local source's block count and share of the blocks drawn (None for a streamed dataset)."""
        if self.blocks is None:
            return None
        return [
            {"source": s.source, "blocks": s.count, "share": round(s.draws / self.pass_length, 4)} for s in self.shares
        ]

    def _pass_order(self, epoch: int) -> torch.Tensor:
        """The block indices of one pass: every source's draws, shuffled together."""
        seed = self.recipe.seed * 1_000_003 + epoch
        draws = torch.cat([self._source_draws(share, seed * 1_009 + i) for i, share in enumerate(self.shares)])
        return draws[torch.randperm(len(draws), generator=torch.Generator().manual_seed(seed))]

    @staticmethod
    def _source_draws(share: SourceShare, seed: int) -> torch.Tensor:
        """Each of the source's blocks draws // count times, plus draws % count of them picked afresh each pass."""
        whole, rest = divmod(share.draws, share.count)
        picked = torch.arange(share.count).repeat(whole)
        if rest:
            subset = torch.randperm(share.count, generator=torch.Generator().manual_seed(seed))[:rest]
            picked = torch.cat([picked, subset])
        return share.start + picked

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
    training, sizes = (None, []) if streamed else _local_training_blocks(recipe, tokenizer)
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
        sizes = _without_last(sizes, held)
    if training is not None and len(training) == 0:
        raise KvshrinkError(
            f"the training data holds less than one {recipe.seq_len}-token block: add text or lower seq_len"
        )
    if len(validation) == 0:
        raise KvshrinkError(
            f"the validation text holds less than one {recipe.seq_len}-token block: add text or lower seq_len"
        )
    return TrainingStream(recipe, tokenizer, training, source_shares(recipe.data, sizes)), validation


def _local_training_blocks(recipe: Recipe, tokenizer) -> tuple[Blocks, list[int]]:
    """Every local source's training blocks, one source after another (each packs its own text), and their counts."""
    per_source = [
        collect_blocks(token_blocks(documents(s, "train"), tokenizer, recipe.seq_len, recipe.packing), recipe.seq_len)
        for s in recipe.data
    ]
    for source, blocks in zip(recipe.data, per_source):
        if source.weight is not None and len(blocks) == 0:
            raise KvshrinkError(
                f"data source {source.describe()} has a weight but holds less than one {recipe.seq_len}-token block: "
                "add text, lower seq_len, or remove the source"
            )
    tokens = torch.cat([blocks.tokens for blocks in per_source])
    lengths = torch.cat([blocks.lengths for blocks in per_source])
    return Blocks(tokens, lengths), [len(blocks) for blocks in per_source]


def _without_last(sizes: list[int], removed: int) -> list[int]:
    """Source block counts after `removed` blocks are taken off the end of their concatenation."""
    kept = sum(sizes) - removed
    return [max(0, min(size, kept - sum(sizes[:i]))) for i, size in enumerate(sizes)]
