"""Tokenizers in every layout a pipeline folder holds (issue 18): ``tokenizer.json`` as
``transformers`` 5 saves it (the layout that made ``ddpm info`` say ``vocab.json: no such
file``), CLIP's ``vocab.json`` + ``merges.txt``, T5's ``spiece.model``; each through
transformers' own loader, offline, the class chosen by ddpm, no file outside the folder."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import Result

from ddpmcli.checkpoints import load_checkpoint, text_encoders
from ddpmcli.errors import CheckpointError

pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.diffusers, pytest.mark.usefixtures("one_thread")]

import pipeline_folders as pf  # noqa: E402 (tests/ is on sys.path)
import test_conditional as tc  # noqa: E402


@pytest.fixture(scope="module")
def sd_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The SD 1.x test folder twice: its tokenizer in the old layout, and as save_pretrained
    writes it today (tokenizer.json and tokenizer_config.json only)."""
    old = tc.sd_folder(tmp_path_factory.mktemp("sd_old"))
    new = tmp_path_factory.mktemp("sd_new") / "sd"
    shutil.copytree(old, new)
    shutil.rmtree(new / "tokenizer")
    pf.write_clip_tokenizer(new / "tokenizer", "tokenizer.json")
    assert sorted(p.name for p in (new / "tokenizer").iterdir()) == [
        "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    return old, new


def test_sd_folder_saved_by_current_transformers_opens(
    cli: Callable[..., Result], sd_pair: tuple[Path, Path]
) -> None:
    old, new = sd_pair
    result = cli("info", str(new), "--prompt", "a cat", "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)[0]["prompt"] == "a cat"
    x, t = torch.randn(2, 4, 4, 4), torch.tensor([2, 11])
    want = load_checkpoint(old, prompt="a cat").predict(x, t)[0]
    torch.testing.assert_close(load_checkpoint(new, prompt="a cat").predict(x, t)[0], want)


def test_clip_layouts_give_the_same_ids(tmp_path: Path) -> None:
    ids = []
    for layout in ("tokenizer.json", "files"):
        tok = text_encoders.load_tokenizer(
            pf.write_clip_tokenizer(tmp_path / layout, layout), "clip"
        )
        assert type(tok).__name__ == "CLIPTokenizer" and tok.model_max_length == pf.CLIP_LENGTH
        ids.append(text_encoders.token_ids(tok, "a cat", pf.CLIP_LENGTH).tolist())
    assert ids[0] == ids[1] == [[52, 26, 2, 0, 45, 53, 53, 53]]  # bos a</w> c a t</w> eos pad


def test_t5_tokenizer_json(tmp_path: Path) -> None:
    tok = text_encoders.load_tokenizer(pf.write_t5_tokenizer(tmp_path / "t5"), "t5")
    assert type(tok).__name__ == "T5Tokenizer"
    pieces = pf.T5_PIECES
    got = text_encoders.token_ids(tok, "a cat", 6).tolist()[0]
    # "\u2581a" then "\u2581c" "a" "t" (every multi-letter piece absent), eos, pad
    want = [pieces.index(p) for p in ("\u2581a", "\u2581c", "a", "t", "</s>", "<pad>")]
    assert got == want


def test_t5_spiece_model(tmp_path: Path) -> None:
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    folder = pf.write_t5_tokenizer(tmp_path / "t5", "spiece.model")
    assert sorted(p.name for p in folder.iterdir()) == ["spiece.model"]
    tok = text_encoders.load_tokenizer(folder, "t5")
    own = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    want = [*own.encode("a cat dog"), 1]  # the tokenizer's own pieces, then T5's </s>
    assert text_encoders.token_ids(tok, "a cat dog", len(want)).tolist()[0] == want


def test_hostile_tokenizer_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no tokenizer .tokenizer.json, vocab.json"):
        text_encoders.load_tokenizer(empty, "clip")
    outside = pf.write_clip_tokenizer(tmp_path / "outside", "files")
    (outside / "tokenizer_config.json").write_text('{"vocab_file": "../../etc/passwd"}')
    with pytest.raises(CheckpointError, match="vocab_file names '../../etc/passwd', not a file"):
        text_encoders.load_tokenizer(outside, "clip")
    big = pf.write_clip_tokenizer(tmp_path / "big")
    monkeypatch.setattr(text_encoders, "MAX_TOKENIZER_BYTES", 100)
    with pytest.raises(CheckpointError, match="tokenizer.json: tokenizer file is larger than"):
        text_encoders.load_tokenizer(big, "clip")
    monkeypatch.undo()
    corrupt = pf.write_clip_tokenizer(tmp_path / "corrupt")
    (corrupt / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="bad tokenizer"):
        text_encoders.load_tokenizer(corrupt, "clip")


def test_spiece_model_without_sentencepiece_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "t5"
    folder.mkdir()
    (folder / "spiece.model").write_bytes(b"\x00" * 16)
    monkeypatch.setattr(text_encoders, "_has_module", lambda name: name != "sentencepiece")
    with pytest.raises(CheckpointError, match=r"needs sentencepiece: pip install 'ddpmcli\[t5\]'"):
        text_encoders.load_tokenizer(folder, "t5")
