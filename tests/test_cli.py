from __future__ import annotations

import json
from pathlib import Path

import pytest

import d2l_memory.cli_memory as cli_memory
from d2l_memory.cli import main
from d2l_memory.provider import MemoryProvider, ProviderConfig
from d2l_memory.storage import open_store
from tiny import tiny_engine


@pytest.fixture(autouse=True)
def tiny_provider(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The CLI builds its provider through one function; tests swap in the tiny engine there.
    engine = tiny_engine()

    def provider(args, **config):  # noqa: ANN001, ANN202
        return MemoryProvider(engine, open_store(args.store, args.blobs), ProviderConfig(**config))

    monkeypatch.setattr(cli_memory, "_provider", provider)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_add_list_show_ask_delete(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "notes.md"
    doc.write_text("Alice lives in Paris and works as a baker since 1999. " * 3)
    code, out, _ = run(capsys, "add", str(doc), "--scope", "acme/alice", "--json")
    assert code == 0
    added = json.loads(out)[0]
    assert added["status"] == "created" and added["chunks"] >= 1
    code, out, _ = run(capsys, "add", str(doc), "--scope", "acme/alice", "--json")
    assert json.loads(out)[0]["status"] == "unchanged"

    code, out, _ = run(capsys, "list", "--scope", "acme", "--json")
    assert [r["id"] for r in json.loads(out)] == [added["id"]]
    code, out, _ = run(capsys, "list", "--scope", "other", "--json")
    assert json.loads(out) == []
    code, out, _ = run(capsys, "show", added["id"], "--json")
    assert "Paris" in json.loads(out)["source_text"]

    code, out, _ = run(
        capsys, "ask", "Where does Alice live?", "--scope", "acme/alice", "--json", "--max-new-tokens", "3"
    )
    answer = json.loads(out)
    assert code == 0 and answer["recall"]["memories"][0]["id"] == added["id"]
    code, out, err = run(capsys, "ask", "Where?", "--scope", "acme/alice", "--show-recall", "--max-new-tokens", "2")
    assert code == 0 and added["id"] in err

    code, _, _ = run(capsys, "export", added["id"], str(tmp_path / "peft"))
    assert code == 0 and (tmp_path / "peft" / "adapter_config.json").is_file()
    code, _, _ = run(capsys, "delete", added["id"], "--scope", "acme/alice")
    assert code == 0
    code, _, err = run(capsys, "show", added["id"])
    assert code == 3 and "no record" in err


def test_bad_input_gives_nonzero_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    binary = tmp_path / "x.bin"
    binary.write_bytes(bytes(range(256)))
    assert run(capsys, "add", str(binary))[0] == 2
    assert run(capsys, "add", str(tmp_path / "missing.txt"))[0] == 2
    assert run(capsys, "show", "../../etc/passwd")[0] == 2
    assert run(capsys, "show", "0" * 32)[0] == 3
    with pytest.raises(SystemExit) as exc:
        main(["list", "--scope", "a/b/c/d/e"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["list", "--scope", "bad tenant!"])
    for bad in (["--modes", "adapter", "telepathy"], ["--recall-chunks", "0"], ["--recall-chunks", "two"],
                ["--min-chunk-tokens", "0"], ["--chunk-tokens", "big"], ["--short-document-chunks", "-1"],
                ["--seed", "two"]):
        with pytest.raises(SystemExit) as exc:
            main(["eval", *bad])
        assert exc.value.code == 2, bad
    assert "telepathy" in capsys.readouterr().err


def test_chat_compacts_old_turns(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    lines = iter([f"Fact number {i}: Alice lives in Paris." for i in range(4)] + ["/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    code, out, err = run(capsys, "chat", "--scope", "acme/alice/bot/s1", "--keep", "2", "--max-new-tokens", "2")
    assert code == 0 and out.count("bot>") == 4
    assert "[memory] compacted" in err


def test_export_checkpoint_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from d2l_memory.training.trainer import Trainer
    from test_training import tiny_config
    from tiny import tiny_base

    Trainer(tiny_config(tmp_path / "run", steps=2), base=tiny_base()).run(progress=False)
    code, _, _ = run(capsys, "export-checkpoint", str(tmp_path / "run"), str(tmp_path / "ckpt"), "--plot")
    assert code == 0
    meta = json.loads((tmp_path / "ckpt" / "hypernet.json").read_text())
    assert meta["training"]["step"] == 2 and "export-checkpoint" in meta["training"]["command"]
    assert (tmp_path / "ckpt" / "training.png").is_file()
    code, _, err = run(capsys, "export-checkpoint", str(tmp_path / "nowhere"), str(tmp_path / "x"))
    assert code == 2 and "no training state" in err
