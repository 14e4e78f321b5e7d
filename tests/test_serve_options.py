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
    options = ["--no-native-decode", "--quantization", "int4", "--max-num-seqs", "4", "--kv-cache-memory", "64MiB"]
    argv = [command, *options, "--prefill-weights", "bf16"]
    config = engine_config(build_parser().parse_args(argv))
    assert not config.native_decode
    assert config.quantization == "int4" and config.prefill_weights == "bf16"
    assert config.max_num_seqs == 4
    assert config.kv_cache_memory == 64 * 1024 * 1024
    assert engine_config(build_parser().parse_args([command, "--native-decode"])).native_decode


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--quantization", "int3", "quantization must be one of auto, none, int4, fp16-only, gguf"),
        ("--quantization", "fp16", "fp16 was retired: int4 keeps the same packed fp16 decode weights"),
        ("--prefill-weights", "int3", "invalid choice: 'int3'"),
    ],
)
def test_an_unknown_or_retired_weight_format_is_a_usage_error(
    option: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", option, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_engine_config_refuses_a_retired_format_with_what_replaced_it() -> None:
    with pytest.raises(ValueError, match="fp16-only keeps one fp16 copy"):
        EngineConfig(quantization="fp16")


def test_reading_a_config_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, tricklm.config as c, tricklm.model.config; from tricklm.model.weights import modes\n"
        "c.EngineConfig(); modes.weight_format('auto', gguf=False); print('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
