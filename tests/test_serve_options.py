"""`tricklm serve|demo` options reach the engine config, with the dataclass's defaults."""

from __future__ import annotations

import pytest

from tricklm.config import EngineConfig
from tricklm.options import build_parser, engine_config


def test_defaults_come_from_the_engine_config() -> None:
    config = engine_config(build_parser().parse_args(["serve"]))
    assert config == EngineConfig()
    assert config.native_decode and config.quantization == "auto" and config.prefill_weights == "auto"


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_engine_options_reach_the_config(command: str) -> None:
    options = ["--no-native-decode", "--quantization", "fp16", "--max-num-seqs", "4", "--kv-cache-memory", "64MiB"]
    argv = [command, *options, "--prefill-weights", "bf16"]
    config = engine_config(build_parser().parse_args(argv))
    assert not config.native_decode
    assert config.quantization == "fp16" and config.prefill_weights == "bf16"
    assert config.max_num_seqs == 4
    assert config.kv_cache_memory == 64 * 1024 * 1024
    assert engine_config(build_parser().parse_args([command, "--native-decode"])).native_decode


@pytest.mark.parametrize("option", ["--quantization", "--prefill-weights"])
def test_an_unknown_weight_format_is_a_usage_error(option: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", option, "int3"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'int3'" in capsys.readouterr().err


def test_reading_a_config_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, tricklm.config as c, tricklm.model.config; c.EngineConfig(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
