"""TRICKLM_ISA: any machine runs the paths of the CPUs it is not, and a path this CPU lacks is refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tiny_models import make_tiny_model
from tricklm.config import EngineConfig
from tricklm.engine.core import EngineCore
from tricklm.model.native import decoder as native
from tricklm.model.native import isa
from tricklm.model.weights.loader import load_model
from tricklm.model.weights.qlinear import load_qmatmul, qmatmul
from tricklm.model.weights.quant import quantize

ext = load_qmatmul()
needs_kernels = pytest.mark.skipif(ext is None, reason="the native kernels cannot be built here")


def test_unset_or_auto_forces_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    for value in ("", "auto", " AUTO "):
        monkeypatch.setenv(isa.ISA_ENV, value)
        assert isa.forced() is None
    monkeypatch.delenv(isa.ISA_ENV)
    assert isa.forced() is None


def test_an_unknown_path_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(isa.ISA_ENV, "avx512")
    with pytest.raises(ValueError, match=r"TRICKLM_ISA='avx512' is not one of auto, scalar, avx2, avx512vnni, amx"):
        isa.forced()


@needs_kernels
def test_each_path_below_the_cpus_best_runs_when_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    best = isa.best(ext)
    for path in isa.PATHS[: isa.PATHS.index(best) + 1]:
        monkeypatch.setenv(isa.ISA_ENV, path)
        isa.check(ext)
        assert ext.isa() == (ext.cpu_isa() if path == "amx" else path)  # AMX's few-row steps: the best int8 kernel
        assert ext.amx() == (path == "amx")
        assert f"{isa.ISA_ENV}={path}" in isa.describe(ext)


@needs_kernels
def test_a_path_above_the_cpus_best_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    best = isa.best(ext)
    if best == isa.PATHS[-1]:
        pytest.skip("this CPU has every path")
    above = isa.PATHS[isa.PATHS.index(best) + 1]
    monkeypatch.setenv(isa.ISA_ENV, above)
    with pytest.raises(ValueError, match=f"TRICKLM_ISA={above}: this CPU's best path is {best}"):
        isa.check(ext)
    assert ext.isa() == ext.cpu_isa()  # the kernels themselves fall back to the best there is


@needs_kernels
def test_a_forced_path_computes_what_that_kernel_computes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    model = quantize(load_model(make_tiny_model(tmp_path, "LlamaForCausalLM", weight_std=0.1)), "q4_1")
    weight = model.model.layers[0].mlp.down_proj.qweight  # type: ignore[attr-defined]
    x = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0))
    monkeypatch.setenv(isa.ISA_ENV, "scalar")
    assert torch.equal(qmatmul(x, weight), qmatmul(x, weight, "scalar"))
    if ext.cpu_isa() != "scalar":
        monkeypatch.setenv(isa.ISA_ENV, "avx2")
        assert torch.equal(qmatmul(x, weight), qmatmul(x, weight, "avx2"))


@needs_kernels
@pytest.mark.skipif(native.load_extension() is None, reason="the native model step cannot be built here")
def test_a_forced_avx2_path_keeps_attention_eight_wide(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    model = quantize(load_model(make_tiny_model(tmp_path, "LlamaForCausalLM", weight_std=0.1)), "q4_1")
    monkeypatch.setenv(isa.ISA_ENV, "avx2")
    decoder = EngineCore(model, EngineConfig(block_size=4)).runner.native
    assert decoder is not None and not decoder.stack.avx512_attention


def test_cpu_flags_and_model_come_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse avx2 fma f16c bmi2\n")
    assert isa.cpu_flags(cpuinfo) == ["avx2", "fma", "f16c"]
    assert isa.cpu_model(cpuinfo) == "AMD EPYC 7B13"
    assert isa.cpu_flags(tmp_path / "missing") == [] and isa.cpu_model(tmp_path / "missing") == "unknown CPU"


@needs_kernels
def test_the_kernels_read_the_variable_as_python_does(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(isa.ISA_ENV, " Scalar ")
    assert isa.forced() == "scalar" and ext.isa() == "scalar"


def test_the_older_amx_switch_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRICKLM_AMX", "0")
    with pytest.raises(ValueError, match="TRICKLM_AMX is no longer read: TRICKLM_ISA=avx512vnni keeps AMX off"):
        isa.forced()


def test_an_engine_refuses_a_bad_path_when_it_loads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tricklm.engine.engine import Engine

    path = make_tiny_model(tmp_path, "LlamaForCausalLM")
    monkeypatch.setenv(isa.ISA_ENV, "avx3")
    with pytest.raises(ValueError, match="TRICKLM_ISA='avx3' is not one of"):
        Engine(EngineConfig(model=str(path)), progress=False)
