"""Templates: built-in ids and the user's own text, checked when a config loads; prompt stores record
the template's text hash; prompts trained under one template are refused under another unless told."""

import pyarrow as pa
import pytest

from puma_ray import config as C
from puma_ray import templates
from puma_ray.errors import PumaError
from puma_ray.identity import store_meta
from puma_ray.pipeline import migrate
from puma_ray.schema import StoreMeta, read_store_meta, write_prompt_store
from puma_ray.stage1 import train_prompts
from puma_ray.storage import write_table

OWN = "Item: <ItemTitle> . User: <UserID> . Rating 1-5? Answer:"


def test_builtin_ids_and_text():
    assert templates.resolve(None, "rating") == templates.Template("rating_v1", templates.BUILTIN["rating_v1"])
    first = templates.resolve("rating_item_first", "rating")
    assert first.text.index("<ItemTitle>") < first.text.index("<UserID>") and first.text.endswith("<UserID> . Answer:")
    ctr = templates.resolve("ctr_item_first", "ctr").text
    assert ctr.index("<ItemTitleList>") < ctr.index("<ItemTitle>") < ctr.index("<UserID>")
    own = templates.resolve(OWN, "rating")
    assert (own.name, own.spec, own.hash) == ("custom", OWN, templates.text_hash(OWN))
    assert templates.spec_hash("rating_v1") == templates.text_hash(templates.BUILTIN["rating_v1"])


@pytest.mark.parametrize(
    "text, problem",
    [
        ("User <UserID> likes <Movie> ? Answer:", r"unknown slot\(s\) <Movie>"),
        ("Rate <ItemTitle> . Answer:", r"<UserID> appears 0 time\(s\); it must appear exactly once"),
        ("<UserID> and <UserID> rate <ItemTitle>", r"<UserID> appears 2 time\(s\)"),
        ("<UserID> rates something . Answer:", r"<ItemTitle> appears 0 time\(s\)"),
        ("<ItemTitleList> <ItemTitleList> <UserID> <ItemTitle>", r"<ItemTitleList> appears 2 time\(s\); .* at most 1"),
    ],
)
def test_bad_template_text_is_one_line_at_config_load(text, problem):
    base = {"model": {"path": "m"}, "data": {"train": "t"}, "output": "o", "template": text}
    for cls, extra in ((C.PromptsConfig, {}), (C.MigrateConfig, {"sources": ["s"]})):
        with pytest.raises(PumaError, match=problem) as e:
            C.build(cls, {**base, **extra})
        assert "\n" not in str(e.value) and "template" in str(e.value)


def test_unknown_id_and_another_tasks_id():
    with pytest.raises(PumaError, match="'rating_v2': not a built-in id"):
        C.build(
            C.PromptsConfig, {"model": {"path": "m"}, "data": {"train": "t"}, "output": "o", "template": "rating_v2"}
        )
    with pytest.raises(PumaError, match="'ctr_v1' is for another task"):
        templates.resolve("ctr_v1", "rating")


def test_store_records_the_template_hash_and_old_stores_derive_it(tmp_path):
    meta = StoreMeta(model="m", model_fingerprint="f", hidden_size=2, prompt_length=1, template=OWN, stage="prompts")
    assert meta.template_hash == templates.text_hash(OWN)
    write_prompt_store(str(tmp_path / "s"), meta, ["u"], [[0.0, 1.0]])
    assert read_store_meta(str(tmp_path / "s")) == meta
    old = {k: v for k, v in meta.to_metadata().items() if k != b"puma.template_hash"}  # written before it existed
    assert StoreMeta.from_metadata("old", old).template_hash == templates.text_hash(OWN)


def _store(path, template: str) -> str:
    meta = StoreMeta(
        model="m", model_fingerprint="f", hidden_size=2, prompt_length=1, template=template, stage="prompts"
    )
    write_prompt_store(str(path), meta, ["u1", "u2"], [[0.0, 1.0], [1.0, 0.0]])
    return str(path)


def test_migrate_refuses_another_template_before_any_work(tmp_path, monkeypatch):
    """Refused from the store footers, before Ray starts; allow_template_change lets it through."""
    src = _store(tmp_path / "src", "rating_item_first")
    rows = {"user_id": ["u1", "u2"], "item_id": ["i1", "i2"], "label": [3.0, 4.0], "item_text": ["a", "b"]}
    write_table(str(tmp_path / "t" / "part-0.parquet"), pa.table(rows))  # its footers are read before Ray
    base = {
        "model": {"path": "m"},
        "sources": [src],
        "data": {"train": str(tmp_path / "t")},
        "output": str(tmp_path / "o"),
    }
    cfg = C.build(C.MigrateConfig, {**base, "template": "rating_v1", "evaluate": False})
    monkeypatch.setattr("puma_ray.pipeline.init_ray", lambda *a: pytest.fail("Ray started"))
    with pytest.raises(
        PumaError,
        match=r"src: prompts were trained under template rating_item_first and this run "
        r"uses rating_v1; set allow_template_change=true",
    ):
        migrate(cfg)
    other = _store(tmp_path / "other", OWN)
    with pytest.raises(PumaError, match="different templates"):
        migrate(C.build(C.MigrateConfig, {**base, "sources": [src, other], "evaluate": False}))
    allowed = cfg.model_copy(update={"allow_template_change": True})
    with pytest.raises(pytest.fail.Exception, match="Ray started"):
        migrate(allowed)
    with pytest.raises(pytest.fail.Exception, match="Ray started"):  # no template given: the sources'
        migrate(C.build(C.MigrateConfig, {**base, "evaluate": False}))


def test_stage1_refuses_init_prompts_of_another_template(tmp_path, stage1_cfg, tiny_models, ray_session):
    """init_prompts trained under item-first used by a run under the paper's template: refused before
    training; without a template the run takes the init store's."""
    meta = store_meta(tiny_models["llama"], "rating", "rating_item_first", 2, "coldstart")
    init = tmp_path / "init"
    write_prompt_store(str(init), meta, ["nobody"], [[0.0] * meta.width])
    cfg = stage1_cfg(tmp_path, init_prompts=str(init), template="rating_v1")
    with pytest.raises(PumaError, match="init: prompts were trained under template rating_item_first"):
        train_prompts(cfg)
