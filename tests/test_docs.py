from hemocam.docs import REPO, config_table, updated_readme


def test_readme_config_keys_match_schema():
    text = (REPO / "README.md").read_text()
    assert updated_readme(text, config_table()) == text, "README config keys are stale: run python -m hemocam.docs"


def test_every_config_key_is_listed():
    table = config_table()
    for key in ("input.format", "classifier.arch", "pseudomask.cam_threshold", "batching.gpu_jobs", "model.segmenter"):
        assert f"`{key}`" in table
