"""Exact resume: a run killed with SIGKILL and resumed ends with the same weights as an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kvshrink.convert.errors import KvshrinkError
from kvshrink.uptrain import load_recipe, uptrain
from kvshrink.uptrain.checkpoints import checkpoint_dirs
from kvshrink.uptrain.data import build_data

STEPS = 24


def _run(recipe: Path, log: Path, *args: str) -> subprocess.Popen:
    with log.open("w") as handle:  # a file, not a pipe: a full pipe would stall the child
        return subprocess.Popen(
            [sys.executable, "-m", "kvshrink.uptrain", str(recipe), *args],
            stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"},
        )


def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path, tiny_llama_dir, write_recipe):
    keys = dict(model=str(tiny_llama_dir), max_steps=STEPS, save_interval=4, keep_last=2, micro_batch_size=2,
                gradient_accumulation=2, schedule={"kind": "cosine", "warmup_steps": 5})
    reference = load_recipe(write_recipe(**keys, output_dir=str(tmp_path / "reference")))
    uptrain(reference)

    recipe = write_recipe(**keys, output_dir=str(tmp_path / "killed"))
    output = tmp_path / "killed"
    log = tmp_path / "log.txt"
    process = _run(recipe, log)
    while not any(int(p.name.split("-")[1]) >= 8 for p in checkpoint_dirs(output)):
        assert process.poll() is None, log.read_text()
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (output / "uptrain_report.json").exists(), "the run finished before it could be killed"
    killed_at = checkpoint_dirs(output)[-1].name
    assert len(checkpoint_dirs(output)) <= 2  # keep_last

    resumed = _run(recipe, log, "--resume")
    assert resumed.wait() == 0, log.read_text()
    assert f"resuming from {output / 'checkpoints' / killed_at}" in log.read_text()
    expected = load_file(Path(reference.output_dir) / "model.safetensors")
    actual = load_file(output / "model.safetensors")
    assert killed_at != f"step-{STEPS:08d}"
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_data_order_is_a_pure_function_of_position(tiny_llama_dir, write_recipe):
    from transformers import AutoTokenizer

    recipe = load_recipe(write_recipe(model=str(tiny_llama_dir), seq_len=256))
    stream, _ = build_data(recipe, AutoTokenizer.from_pretrained(tiny_llama_dir))
    count = len(stream.blocks)
    whole = [ids for ids, _ in zip(stream.blocks_from(0), range(count + 10))]
    later = [ids for ids, _ in zip(stream.blocks_from(count - 5), range(15))]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(whole[count - 5 :], later))
    first_epoch = torch.stack([ids for ids, _ in whole[:count]])
    assert sorted(first_epoch.tolist()) == sorted(stream.blocks.tokens.tolist())  # a permutation
    assert not torch.equal(first_epoch, stream.blocks.tokens.long())  # shuffled


def test_weights_set_each_sources_share_of_every_pass(tiny_llama_dir, write_recipe):
    """pydoc's train split holds about a tenth of kjv's blocks; weights 1 and 1 draw them half and half, each pydoc
    block about five times a pass, and reading from a later position still gives what an uninterrupted read had."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    by_size = load_recipe(
        write_recipe(model=str(tiny_llama_dir), seq_len=256, data=[{"corpus": "pydoc"}, {"corpus": "kjv"}])
    )
    weighted = load_recipe(write_recipe(
        model=str(tiny_llama_dir), seq_len=256, data=[{"corpus": "pydoc", "weight": 1}, {"corpus": "kjv", "weight": 1}]
    ))
    pydoc, kjv = build_data(by_size, tokenizer)[0].shares
    assert (pydoc.draws, kjv.draws) == (pydoc.count, kjv.count) and kjv.count > 5 * pydoc.count
    stream, _ = build_data(weighted, tokenizer)
    length = stream.pass_length
    assert stream.shares[0].draws == stream.shares[1].draws and abs(length - pydoc.count - kjv.count) <= 1
    assert [(row["source"], row["share"]) for row in stream.mix()] == [("corpus pydoc", 0.5), ("corpus kjv", 0.5)]
    first_pass = [tuple(ids.tolist()) for (ids, _), _ in zip(stream.blocks_from(0), range(length))]
    pydoc_blocks = {tuple(row) for row in stream.blocks.tokens[: pydoc.count].tolist()}
    assert sum(block in pydoc_blocks for block in first_pass) == length // 2
    assert len({block for block in first_pass if block in pydoc_blocks}) == pydoc.count  # every pydoc block drawn
    later = [tuple(ids.tolist()) for (ids, _), _ in zip(stream.blocks_from(length - 3), range(6))]
    assert later[:3] == first_pass[-3:]


def test_a_weighted_source_without_a_whole_block_is_named(tmp_path, tiny_llama_dir, write_recipe):
    from transformers import AutoTokenizer

    short = tmp_path / "short.txt"
    short.write_text("Too short for one block.")
    recipe = load_recipe(write_recipe(
        model=str(tiny_llama_dir), seq_len=256,
        data=[{"path": str(short), "weight": 1}, {"corpus": "pydoc", "weight": 1}],
    ))
    with pytest.raises(
        KvshrinkError, match=f"data source path {short} has a weight but holds less than one 256-token block"
    ):
        build_data(recipe, AutoTokenizer.from_pretrained(tiny_llama_dir))


def test_streamed_datasets_resume_at_the_same_block(tmp_path, tiny_llama_dir, write_recipe):
    """An `hf:` source (here the packaged json builder on a local file, offline) is read in stream order, and
    reading from position p gives the blocks an uninterrupted read had at p."""
    import json

    from transformers import AutoTokenizer

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"document {i}: " + "words " * (i % 7 + 3)}) + "\n" for i in range(40)))
    recipe = load_recipe(write_recipe(
        model=str(tiny_llama_dir), seq_len=16,
        data=[{"hf": "json", "data_files": str(rows), "split": "train"}], validation={"sources": [{"corpus": "pydoc"}]},
    ))
    stream, _ = build_data(recipe, AutoTokenizer.from_pretrained(tiny_llama_dir))
    assert stream.blocks is None  # streamed, not held in memory
    whole = [ids for ids, _ in zip(stream.blocks_from(0), range(60))]  # past the end: the stream starts over
    later = [ids for ids, _ in zip(stream.blocks_from(25), range(35))]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(whole[25:], later))
    assert len({tuple(ids[0].tolist()) for ids in whole}) > 10


def test_resume_refuses_a_different_global_batch(tiny_llama_dir, write_recipe):
    recipe = load_recipe(write_recipe(model=str(tiny_llama_dir), max_steps=1))
    uptrain(recipe)
    changed = load_recipe(write_recipe(model=str(tiny_llama_dir), max_steps=2, micro_batch_size=3))
    with pytest.raises(KvshrinkError, match="trained with 2 sequences per step, this run would use 3"):
        uptrain(changed, resume=True)
