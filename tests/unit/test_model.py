"""Model factory and weight loading: official/timm/project checkpoints, EMA choice, safe loading."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from model.config import ModelConfig
from model.factory import create_model
from orchestrator.errors import CheckpointError
from orchestrator.weight_lookup import load_into as load_weights

ATTO = ModelConfig(name="inception_next_atto", num_classes=10, drop_path_rate=0.1, head_dropout=0.5, ls_init_value=1e-6)


def test_factory_applies_the_model_section() -> None:
    model = create_model(ATTO)
    assert model.num_classes == 10 and model.head.drop.p == 0.5
    assert model.stages[0].blocks[0].gamma.detach().max().item() == pytest.approx(1e-6)
    assert max(getattr(m, "drop_prob", 0.0) for m in model.modules()) == pytest.approx(0.1)


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("wrap", ["model", "state_dict", None])
def test_official_and_timm_style_checkpoints_load(tmp_path: Path, wrap: str | None) -> None:
    src = create_model(ATTO)
    path = tmp_path / "release.pth"
    torch.save({wrap: src.state_dict()} if wrap else src.state_dict(), path)
    dst = create_model(ATTO)
    load_weights(dst, str(path))
    assert same(src, dst)


def test_ema_weights_are_preferred_and_said_so(tmp_path: Path) -> None:
    model, ema = create_model(ATTO), create_model(ATTO)
    torch.save({"model": model.state_dict(), "model_ema": ema.state_dict()}, tmp_path / "c.pth")
    dst = create_model(ATTO)
    assert "EMA" in load_weights(dst, str(tmp_path / "c.pth"))
    assert same(ema, dst)


def test_architecture_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    torch.save(create_model(ModelConfig(name="inception_next_tiny", num_classes=10)).state_dict(), tmp_path / "t.pth")
    with pytest.raises(CheckpointError, match=r"t.pth \(plain state dict\): does not fit MetaNeXt.*shape mismatch.*model.name"):
        load_weights(create_model(ATTO), str(tmp_path / "t.pth"))


def test_other_class_count_reinitialises_only_the_classifier(tmp_path: Path) -> None:
    src = create_model(ModelConfig(name="inception_next_atto", num_classes=1000))
    torch.save(src.state_dict(), tmp_path / "in1k.pth")
    dst = create_model(ATTO)
    assert "re-initialised for 10 classes" in load_weights(dst, str(tmp_path / "in1k.pth"))
    assert torch.equal(dst.stem[0].weight, src.stem[0].weight)


def test_arbitrary_pickles_are_refused(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"model": Payload()}))
    with pytest.raises(CheckpointError, match="not a weights-only PyTorch checkpoint"):
        load_weights(create_model(ATTO), str(tmp_path / "evil.pth"))


def test_safetensors_final_weights_load_strictly_in_timm(tmp_path: Path) -> None:
    src = create_model(ATTO)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "model.safetensors")
    loaded = timm.create_model("inception_next_atto", pretrained=True, num_classes=10,
                               pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors"), num_classes=10))
    assert same(src, loaded)


def test_224_weights_initialise_a_384_model(tmp_path: Path) -> None:
    src = create_model(ATTO)
    torch.save({"model": src.state_dict()}, tmp_path / "a224.pth")
    dst = create_model(ATTO)
    load_weights(dst, str(tmp_path / "a224.pth"))
    dst.eval()
    assert dst(torch.randn(1, 3, 384, 384)).shape == (1, 10)
