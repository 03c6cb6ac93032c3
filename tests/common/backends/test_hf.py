import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import model_catalog
from common.backends import load_backend
from common.backends.batched_hf import HFBatchedBackend
from common.backends.hf import HFBackend
from common.settings import StageSettings
from common.tokenization import fingerprint, load_tokenizer
from tests.tiny_models import EOS, VOCAB_SIZE, noisy_copy, save_tokenizer, tiny_llama

PROMPT = [1, 5, 17, 33, 60, 8]
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("target"))


@pytest.fixture(scope="module")
def target(target_dir):
    return HFBackend(str(target_dir))


def generate(model, prompt: list[int], n: int) -> list[int]:
    """transformers' own greedy decoding, never stopping at EOS."""
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
    )
    return out[0, len(prompt) :].tolist()


def step_by_step(backend, prompt: list[int], n: int) -> list[int]:
    session = backend.new_session(prompt[:-1])
    out = [prompt[-1]]
    while len(out) <= n:
        out += session.forward(out[-1:])
    assert session.length == len(prompt) + n - 1
    return out[1:]


def verify_with_drafts(backend, prompt: list[int], reference: list[int]) -> list[int]:
    """Greedy speculative decoding with drafts taken from ``reference``, every third one corrupted.

    Blocks of 1..5 drafts are checked in one forward; the cache is cropped back after each rejection.
    """
    session = backend.new_session(prompt[:-1])
    out, last, block = [], prompt[-1], 0
    while len(out) < len(reference):
        block += 1
        drafts = reference[len(out) : len(out) + block % 5 + 1]
        if block % 3 == 0:
            drafts[-1] = (drafts[-1] + 1) % VOCAB_SIZE
        base = session.length
        preds = session.forward([last] + drafts)
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == preds[accepted]:
            accepted += 1
        session.crop(base + 1 + accepted)  # keep `last` and the accepted drafts
        out += drafts[:accepted] + [preds[accepted]]
        last = out[-1]
    return out[: len(reference)]


def test_metadata(target, target_dir):
    assert (target.kind, target.can_verify, target.name) == ("hf", True, str(target_dir))
    assert target.eos_token_ids == (EOS,)
    assert target.max_context == 512
    assert next(target.model.parameters()).dtype == torch.float32


def test_step_by_step_greedy_equals_generate(target, target_dir):
    reference = generate(AutoModelForCausalLM.from_pretrained(target_dir), PROMPT, NEW_TOKENS)
    assert step_by_step(target, PROMPT, NEW_TOKENS) == reference


def test_verify_and_crop_equals_generate(target, target_dir):
    reference = generate(AutoModelForCausalLM.from_pretrained(target_dir), PROMPT, NEW_TOKENS)
    assert verify_with_drafts(target, PROMPT, reference) == reference


def test_crop_then_refeed_gives_the_same_predictions(target):
    session = target.new_session(PROMPT)
    first = session.forward([7, 8, 9, 10])
    session.crop(len(PROMPT) + 1)
    assert session.length == len(PROMPT) + 1
    assert session.forward([8, 9, 10]) == first[1:]
    session.crop(session.length)  # no-op
    assert session.length == len(PROMPT) + 4
    session.crop(0)
    assert session.forward(PROMPT + [7]) == target.new_session([]).forward(PROMPT + [7])


def test_crop_out_of_range(target):
    session = target.new_session(PROMPT)
    with pytest.raises(ValueError):
        session.crop(len(PROMPT) + 1)
    with pytest.raises(ValueError):
        session.crop(-1)


def test_empty_context_and_empty_forward(target):
    session = target.new_session([])
    assert session.length == 0 and session.forward([]) == []
    assert len(session.forward([1])) == 1 and session.length == 1


def test_close_frees_the_cache(target):
    session = target.new_session(PROMPT)
    session.close()
    assert session.length == 0


def test_tokenizer_fingerprint(target, target_dir, tmp_path):
    expected = fingerprint(AutoTokenizer.from_pretrained(target_dir))
    assert target.tokenizer_fingerprint == expected
    draft = HFBackend(str(tiny_llama(tmp_path / "draft", seed=1, layers=2)))
    assert draft.tokenizer_fingerprint == expected  # same vocab, different weights

    save_tokenizer(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(tmp_path / "tok")
    other = HFBackend(str(target_dir), tokenizer=str(tmp_path / "tok"))
    assert other.tokenizer_fingerprint != expected


def agreement(backend, reference_preds: list[int], sequence: list[int]) -> float:
    preds = backend.new_session([]).forward(sequence)
    return sum(a == b for a, b in zip(preds, reference_preds)) / len(sequence)


def test_draft_factories(target, target_dir, tmp_path):
    sequence = PROMPT + step_by_step(target, PROMPT, NEW_TOKENS)
    truth = target.new_session([]).forward(sequence)
    similar = agreement(
        HFBackend(str(noisy_copy(target_dir, tmp_path / "similar"))), truth, sequence
    )
    unrelated = agreement(
        HFBackend(str(tiny_llama(tmp_path / "draft", seed=1, layers=2))), truth, sequence
    )
    assert 0.25 < similar < 0.95 and unrelated < similar


def test_half_precision_loads(target_dir):
    backend = HFBackend(str(target_dir), dtype="bfloat16")
    assert next(backend.model.parameters()).dtype == torch.bfloat16
    preds = backend.new_session(PROMPT).forward([3, 4])
    assert len(preds) == 2 and all(0 <= p < VOCAB_SIZE for p in preds)


def test_threads_setting(target_dir):
    before = torch.get_num_threads()
    try:
        HFBackend(str(target_dir), threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_load_backend(target_dir):
    backend = load_backend(StageSettings(level=1, model=str(target_dir)))
    assert isinstance(backend, HFBatchedBackend) and backend.kind == "hf"


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="no such model"):
        load_backend(StageSettings(level=1, model="/nonexistent/model.gguf"))


def test_hub_id_not_available_offline():
    with pytest.raises(FileNotFoundError, match="common.model_store prepare"):
        load_backend(StageSettings(level=1, model="no-such-org/no-such-model"))


def test_unprepared_model_name(monkeypatch, tmp_path):
    monkeypatch.setenv("PIPESPEC_MODEL_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="common.model_store prepare qwen"):
        load_backend(StageSettings(level=1, model="qwen2.5-coder-0.5b"))


def test_unavailable_backend_kind():
    settings = StageSettings(level=0, backend="ngram").model_copy(update={"backend": "tpu"})
    with pytest.raises(ValueError, match="'tpu' is not available"):
        load_backend(settings)


# --- real models (prepared with `python -m common.model_store prepare ...`) ---


def require(name: str) -> None:
    if not model_catalog.is_prepared(name):
        pytest.skip(
            f"{name} not prepared: run `{model_catalog.PREPARE_COMMAND} {model_catalog.group_for(name)}`"
        )


@pytest.fixture(scope="module")
def smollm2():
    require("smollm2-135m")
    return HFBackend("smollm2-135m")


@pytest.mark.models
def test_smollm2_greedy_equals_generate(smollm2):
    prompt = AutoTokenizer.from_pretrained(model_catalog.model_dir("smollm2-135m"))(
        "The capital of France is Paris. The capital of Germany is"
    )["input_ids"]
    reference = generate(smollm2.model, prompt, 12)
    assert step_by_step(smollm2, prompt, 12) == reference
    assert verify_with_drafts(smollm2, prompt, reference) == reference
    assert smollm2.eos_token_ids == (2,) and smollm2.max_context == 8192


@pytest.mark.models
@pytest.mark.slow
def test_smollm2_from_gguf_matches_the_converted_directory(smollm2):
    gguf = HFBackend(str(model_catalog.gguf_path("smollm2-135m")))
    assert gguf.tokenizer_fingerprint == smollm2.tokenizer_fingerprint
    sequence = [1, 504, 3575, 282, 4649, 314]
    assert gguf.new_session([]).forward(sequence) == smollm2.new_session([]).forward(sequence)


@pytest.mark.models
def test_qwen_models_share_a_tokenizer():
    require("qwen2.5-coder-0.5b")
    require("qwen2.5-coder-1.5b")
    small, large = (
        fingerprint(load_tokenizer(str(model_catalog.model_dir(n))))
        for n in model_catalog.GROUPS["qwen"]
    )
    assert small == large
