import pytest
import torch
from transformers import AutoModelForCausalLM

from common import model_catalog
from common.backends import load_backend
from common.backends.hf import HFBackend
from common.settings import StageSettings
from tests.common.backends.test_hf import generate, require, step_by_step, verify_with_drafts
from tests.tiny_models import tiny_llama

PROMPT = [1, 5, 17, 33, 60, 8]


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("target"), layers=4)


def exit_after(model, layers: int, sequence: list[int]) -> list[int]:
    """Reference without any cache: the full model's hidden state after ``layers`` layers,
    through its final norm and lm_head."""
    with torch.no_grad():
        hidden = model(torch.tensor([sequence]), output_hidden_states=True).hidden_states[layers]
        return model.lm_head(model.model.norm(hidden))[0].argmax(-1).tolist()


def test_runs_only_the_first_layers(target_dir):
    settings = StageSettings(
        level=0, backend="early-exit", model=str(target_dir), early_exit_layers=2
    )
    backend = load_backend(settings)
    assert (backend.kind, backend.can_verify) == ("early-exit", True)
    assert backend.name == f"{target_dir} (first 2 layers)"
    assert len(backend.lm.model.layers) == backend.lm.config.num_hidden_layers == 2


def test_predictions_equal_the_full_models_hidden_state_reference(target_dir):
    full = AutoModelForCausalLM.from_pretrained(target_dir)
    sequence = PROMPT + [9, 10, 11, 12]
    for layers in (1, 3):
        session = HFBackend(str(target_dir), early_exit_layers=layers).new_session(PROMPT[:2])
        preds = session.forward(sequence[2:5]) + [
            p for t in sequence[5:] for p in session.forward([t])
        ]
        assert preds == exit_after(full, layers, sequence)[2:]


def test_cache_follows_the_truncated_model(target_dir):
    backend = HFBackend(str(target_dir), early_exit_layers=2)
    reference = generate(backend.model, PROMPT, 30)
    assert step_by_step(backend, PROMPT, 30) == reference
    assert verify_with_drafts(backend, PROMPT, reference) == reference


def test_all_layers_is_the_full_model(target_dir):
    sequence = PROMPT + [20, 21]
    full = HFBackend(str(target_dir)).new_session([]).forward(sequence)
    assert HFBackend(str(target_dir), early_exit_layers=4).new_session([]).forward(sequence) == full


@pytest.mark.parametrize("layers", [0, 5])
def test_layer_count_out_of_range(target_dir, layers):
    with pytest.raises(ValueError, match="early_exit_layers"):
        HFBackend(str(target_dir), early_exit_layers=layers)


def test_hf_backend_rejects_early_exit_layers(target_dir):
    with pytest.raises(ValueError, match="use backend 'early-exit'"):
        load_backend(
            StageSettings(level=0, backend="hf", model=str(target_dir), early_exit_layers=2)
        )


@pytest.mark.models
def test_smollm2_early_exit():
    require("smollm2-135m")
    backend = HFBackend("smollm2-135m", early_exit_layers=20)
    prompt = [1, 504, 3575, 282, 4649, 314, 7042, 30]
    reference = generate(backend.model, prompt, 8)
    assert step_by_step(backend, prompt, 8) == reference
    full = AutoModelForCausalLM.from_pretrained(model_catalog.model_dir("smollm2-135m"))
    assert backend.new_session([]).forward(prompt) == exit_after(full, 20, prompt)
