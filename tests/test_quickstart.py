"""The quickstart path end to end at toy size: results.json has the promised shape."""

import json


def test_quickstart_results_shape(tmp_path, ray_session):
    from puma_ray.quickstart import quickstart

    results = quickstart(str(tmp_path / "qs"), users=40, epochs=1, num_workers=1)
    on_disk = json.load(open(tmp_path / "qs" / "results.json"))
    assert on_disk["task"] == "rating"
    assert set(on_disk["methods"]) == {"puma", "full_retrain", "source", "random_init", "global_mean", "user_mean"}
    for name, m in on_disk["methods"].items():
        assert set(m) == {"rmse", "mae", "lm_sample_passes", "wall_s"}, name
        assert 0 < m["rmse"] < 4 and 0 < m["mae"] <= m["rmse"]
    assert on_disk["methods"]["source"]["lm_sample_passes"] > 0 and on_disk["methods"]["global_mean"]["lm_sample_passes"] == 0
    assert results["methods"] == on_disk["methods"]
    assert set(on_disk["puma_by_users"]) >= {"rmse_in_adapter_users", "rmse_out_adapter_users"}
