from transformers import AutoModelForCausalLM, AutoTokenizer

from puma_ray.datasets.synthetic import vocabulary
from puma_ray.models import FAMILIES, SPECIAL


def test_every_family_saved_and_loaded_through_from_pretrained(tiny_models):
    assert set(tiny_models) == set(FAMILIES)
    widths = set()
    for family, path in tiny_models.items():
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.config.model_type == FAMILIES[family][0]
        widths.add(model.config.hidden_size)
        assert model.get_input_embeddings().num_embeddings == len(AutoTokenizer.from_pretrained(path))
    assert len(widths) == len(FAMILIES)  # different widths, so migrations change d


def test_tokenizer_single_tokens(tiny_models):
    for family, path in tiny_models.items():
        tok = AutoTokenizer.from_pretrained(path)
        for word in ["Yes", "No", *vocabulary()[::7]]:
            assert len(tok.encode(" " + word, add_special_tokens=False)) == 1, (family, word)
        for d in "12345":  # (qwen2's tokenizer splits " 3" into " " + "3", like the real one)
            assert len(tok.encode(d, add_special_tokens=False)) == 1
        for s in SPECIAL:
            assert len(tok.encode(s, add_special_tokens=False)) == 1, (family, s)
