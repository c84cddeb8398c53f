"""transformers loads what xorweights rebuilds: a tiny real LLaMA fine-tune, encoded, decoded and loaded.

Needs the ``compat`` extra (``pip install 'xorweights[compat]'``); fully
offline: the model, its tokenizer and the fine-tune are made here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed: pip install 'xorweights[compat]' to run these tests"
)
from conftest import run  # noqa: E402
from packaging.version import Version  # noqa: E402 (after the skip: transformers brings packaging)
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import xorweights  # noqa: E402
from xorweights.delta.manifest import MANIFEST_NAME  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs" / "decoding.md"
# from_pretrained's argument for the dtype: `torch_dtype` up to 4.55, `dtype` from 4.56 on (`torch_dtype` still works).
DTYPE_ARG = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
ADDED = ["<|tool|>", "<|end_tool|>"]
TEXT = "w1 w2 <|tool|> w3 w4 w5 <|end_tool|> w6 unknown w7"


@dataclass(frozen=True)
class Release:
    base: Path
    finetuned: Path
    delta: Path


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in memory: 250 words and three special tokens."""
    words = ["[UNK]", "<s>", "</s>"] + [f"w{i}" for i in range(250)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    """A bf16 base, its fine-tune with two added tokens (a few AdamW steps), and the delta between them."""
    root = tmp_path_factory.mktemp("compat")
    base, finetuned, delta = root / "base", root / "finetuned", root / "delta"
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)  # float32: the master weights the fine-tune trains
    model.to(torch.bfloat16).save_pretrained(base, max_shard_size="100KB")  # shards and an index, as releases have
    tokenizer.save_pretrained(base)
    model.to(torch.float32)

    tokenizer.add_tokens(ADDED)
    model.resize_token_embeddings(len(tokenizer))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        ids = torch.randint(0, len(tokenizer), (2, 16))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.to(torch.bfloat16).save_pretrained(finetuned, max_shard_size="100KB")
    tokenizer.save_pretrained(finetuned)
    xorweights.encode(finetuned, base, delta)
    return Release(base, finetuned, delta)


def logits(model: Any) -> torch.Tensor:
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def load(path: Path, **kwargs: Any) -> Any:
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs)


def test_the_release_is_what_it_claims(release: Release) -> None:
    config = json.loads((release.finetuned / "config.json").read_text())
    assert config["vocab_size"] == 253 + len(ADDED)
    assert "bfloat16" in (config.get("dtype"), config.get("torch_dtype"))
    assert (release.finetuned / "model.safetensors.index.json").is_file()
    manifest = json.loads((release.delta / MANIFEST_NAME).read_text())
    modes = {f["name"]: f["mode"] for f in manifest["other_files"]}
    assert modes["config.json"] == "ship"  # the vocabulary grew
    assert "reference" in modes.values()  # generation_config.json is the base's


def test_decoded_folder_loads_with_the_finetunes_logits_and_tokens(release: Release, tmp_path: Path) -> None:
    out = tmp_path / "out"
    xorweights.decode(release.delta, release.base, out)
    assert torch.equal(logits(load(out)), logits(load(release.finetuned)))
    decoded, original = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(release.finetuned)
    assert decoded(TEXT).input_ids == original(TEXT).input_ids
    assert decoded.convert_tokens_to_ids(ADDED) == [253, 254]


def test_dtype_float16_loads_as_float16_with_auto(release: Release, tmp_path: Path) -> None:
    out = tmp_path / "fp16"
    r = run("decode", release.delta, "--base", release.base, "-o", out, "--dtype", "float16", "-q")
    assert r.exit_code == 0, r.output
    model = load(out, **{DTYPE_ARG: "auto"})
    assert model.dtype == torch.float16
    assert all(p.dtype == torch.float16 for p in model.parameters())
    # The same bits as transformers' own conversion of the fine-tune to fp16.
    assert torch.equal(logits(model), logits(load(release.finetuned, **{DTYPE_ARG: torch.float16})))

    # config.json differs from the fine-tune's only in the dtype, and verify accepts the folder.
    text = (release.finetuned / "config.json").read_text()
    assert (out / "config.json").read_text() == re.sub(r'("(?:torch_)?dtype": )"bfloat16"', r'\1"float16"', text)
    assert run("verify", out).exit_code == 0
    # The index keeps transformers' own metadata (total_parameters on 5.x); total_size is the fp16 one.
    original = json.loads((release.finetuned / "model.safetensors.index.json").read_text())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == original["weight_map"]
    assert index["metadata"] == {**original["metadata"], "total_size": index["metadata"]["total_size"]}
    assert index["metadata"]["total_size"] == sum(p.numel() * 2 for p in model.state_dict().values())


# ---------------------------------------------------------------- the recipes in docs/decoding.md


def docs_block(marker: str) -> str:
    """The one Python block of docs/decoding.md's "Straight into torch" section that holds ``marker``."""
    text = DOCS.read_text()
    section = text[text.index("## Straight into torch") :].split("\n## ")[0]
    blocks = [b for b in re.findall(r"```python\n(.*?)```", section, re.S) if marker in b]
    assert len(blocks) == 1, f"{DOCS}: {len(blocks)} Python blocks hold {marker!r}, expected one"
    return blocks[0]


def run_docs(markers: list[str], paths: dict[str, Path], namespace: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run documentation code as it is written, its example paths replaced by ``paths``."""
    namespace = {} if namespace is None else namespace
    for marker in markers:
        code = docs_block(marker)
        for example, path in paths.items():
            code = code.replace(f'"{example}', f'"{path}/')
        if DTYPE_ARG != "dtype":  # as the page says for transformers before 4.56
            code = re.sub(r"(from_pretrained|from_config)\((.*)\bdtype=", r"\1(\2torch_dtype=", code)
        exec(compile(code, str(DOCS), "exec"), namespace)
    return namespace


def release_paths(release: Release) -> dict[str, Path]:
    return {"my-finetune-delta/": release.delta, "llama-7b-hf/": release.base}


LOAD = "xorweights.load_state_dict("
FROM_CONFIG = "model.load_state_dict(sd)"
ITER = "xorweights.iter_state_dict("
FROM_FOLDER = 'from_pretrained("my-finetune-fp16"'


def test_docs_from_config_recipe(release: Release) -> None:
    model = run_docs([LOAD, FROM_CONFIG], release_paths(release))["model"]
    assert model.dtype == torch.bfloat16 and not model.training
    assert torch.equal(logits(model), logits(load(release.finetuned, **{DTYPE_ARG: torch.bfloat16})))


def test_docs_iter_state_dict_recipe(release: Release, capsys: pytest.CaptureFixture[str]) -> None:
    namespace = run_docs([LOAD, FROM_CONFIG], release_paths(release))  # defines config, as the page does
    model = run_docs([ITER], release_paths(release), namespace)["model"]
    assert capsys.readouterr().out == ""  # every tensor found its parameter
    assert model.dtype == torch.bfloat16
    assert torch.equal(logits(model), logits(load(release.finetuned, **{DTYPE_ARG: torch.bfloat16})))


def test_docs_decoded_folder_recipe(release: Release, tmp_path: Path) -> None:
    out = tmp_path / "my-finetune-fp16"
    xorweights.decode(release.delta, release.base, out, dtype="float16")
    namespace = run_docs([FROM_FOLDER], {"my-finetune-fp16": out})
    assert namespace["model"].dtype == torch.float16
    assert namespace["tokenizer"](TEXT).input_ids == AutoTokenizer.from_pretrained(release.finetuned)(TEXT).input_ids


def test_load_state_dict_into_a_fresh_model(release: Release) -> None:
    config = transformers.AutoConfig.from_pretrained(release.delta / "files")
    model = AutoModelForCausalLM.from_config(config, **{DTYPE_ARG: torch.bfloat16})
    model.load_state_dict(xorweights.load_state_dict(release.delta, release.base))
    assert torch.equal(logits(model), logits(load(release.finetuned, **{DTYPE_ARG: torch.bfloat16})))
