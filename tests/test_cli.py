import subprocess
import sys

import pytest

from alibi_lm import __version__
from alibi_lm.cli import build_parser, main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    assert "info" in subparsers.choices
    for name in subparsers.choices:
        assert f"    {name}" in out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: alibi-lm" in capsys.readouterr().out


def test_info_reports_versions_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"alibi-lm            {__version__}" in out
    assert "torch" in out and "triton" in out
    assert "attention backends  reference, sdpa" in out


def test_console_script_entry_point_runs_as_module():
    result = subprocess.run([sys.executable, "-m", "alibi_lm", "info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "attention backends" in result.stdout


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["trane"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_a_missing_argument_is_one_line_naming_the_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "runs/x"])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("alibi-lm generate: error:") and "--prompt" in line and "alibi-lm generate --help" in line


def test_an_unknown_option_points_at_its_commands_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", "tiny", "--data-dir", "x"])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == "alibi-lm train: error: unrecognized arguments: --data-dir x (see alibi-lm train --help)"


def test_unwritable_output_is_one_line_and_exit_code_2(tmp_path, capsys):
    from alibi_lm.data import prepare

    source = tmp_path / "corpus.txt"
    source.write_text("".join(f"line {i} of some text\n" for i in range(40)))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["prepare", str(source), "-o", str(blocker / "out"), "--tokenizer", "bytes", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("alibi-lm prepare: error: ") and str(blocker) in err[0]
    assert blocker.read_text() == "x"
    prepare(str(source), tmp_path / "data", tokenizer="bytes", progress=False)


def test_closed_stdout_stops_quietly():
    code = ("import sys; from alibi_lm import cli; from alibi_lm.commands import info; "
            "info.run = lambda args: [print('x' * 1000, flush=True) for _ in range(10_000)] and 0; "
            "sys.exit(cli.main(['info']))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader went away, as with `alibi-lm generate ... | head`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err, err


def test_help_names_every_preset_and_the_plot_example_has_its_input(capsys):
    from alibi_lm.config import presets

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    train_help = " ".join(capsys.readouterr().out.split())
    assert all(name in train_help for name in presets())
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "-o runs/small/eval.json" in capsys.readouterr().out


@pytest.mark.parametrize("error", [
    MemoryError(),
    RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 256000000000256 bytes."),
])
def test_running_out_of_memory_is_one_line_and_exit_code_2(monkeypatch, capsys, error):
    from alibi_lm.commands import info

    def exhausted(args):
        raise error

    monkeypatch.setattr(info, "run", exhausted)
    assert main(["info"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of memory" in err


def test_other_runtime_errors_are_not_hidden(monkeypatch):
    from alibi_lm.commands import info

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(info, "run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["info"])


def test_version_and_print_config(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"alibi-lm {__version__}"
    assert main(["train", "--config", "tiny", "--set", "optim.lr=0.002", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "[optim]\nlr = 0.002\n" in printed and "[model]" in printed and "position = " in printed


def test_info_says_which_backend_a_model_takes_and_why(tmp_path, capsys):
    from alibi_lm.checkpoint import save_model_checkpoint
    from alibi_lm.model import ModelConfig, TransformerLM

    save_model_checkpoint(tmp_path / "ck", TransformerLM(ModelConfig(attn_dropout=0.1, attn_tolerance=1e-4)),
                          train_len=16)
    assert main(["info", str(tmp_path / "ck"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "training backend    sdpa: no CUDA device (cpu)" in out
    assert "inference backend   sdpa: no CUDA device (cpu)" in out and "attn_tolerance      0.0001" in out


def test_choose_backend_names_its_reason():
    import torch

    from alibi_lm.kernels import choose_backend

    assert choose_backend("cpu", torch.bfloat16, 64, alibi=False)[0] == "sdpa"
    assert "extra additive bias" in choose_backend("cuda", torch.bfloat16, 64, alibi=True, bias=True)[1]
    assert "no CUDA device" in choose_backend("cpu", torch.bfloat16, 64, alibi=True)[1]
    reason = choose_backend("cuda", torch.float32, 64, alibi=True)[1]
    assert "triton" not in reason or "float16 or bfloat16" in reason
