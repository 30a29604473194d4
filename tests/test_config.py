import pytest

from ringfeed.server.config import Config, ConfigError, from_mapping, load_toml


@pytest.mark.parametrize("options, fragment", [
    ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
    ({"batch_size": -4}, "got -4"),
    ({"workers": 0}, "workers must be an integer >= 1, got 0"),
    ({"slots": 2}, "slots must be an integer >= 3, got 2"),
    ({"sampling": "random"}, "sampling must be one of ('shuffle', 'replacement'), got 'random'"),
    ({"endpoint": "http://x"}, "got 'http://x'"),
    ({"heartbeat_s": 0}, "heartbeat_s must be a number > 0.0, got 0"),
    ({"augment": [{"size": 3}]}, "augment[0] must be a table with a string 'op'"),
    ({"name": "a b"}, "name must be 1 to 64 letters"),
    ({"worker_nice": 20}, "worker_nice must be at most 19 (the lowest priority), got 20"),
    ({"worker_nice": -1}, "worker_nice must be an integer >= 0, got -1"),
    ({"private_data": "yes"}, "private_data must be true or false, got 'yes'"),
    ({"streaming_stores": 1}, "streaming_stores must be true or false, got 1"),
    ({"ordered": 1}, "ordered must be true or false, got 1"),
])
def test_bad_options_name_the_value(options, fragment):
    with pytest.raises(ConfigError) as err:
        Config(**options)
    assert fragment in str(err.value)


def test_unknown_option_is_refused():
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['batchsize'\]"):
        from_mapping({"batchsize": 3})


def test_defaults_resolve_endpoint_and_slots():
    from ringfeed.feed import DEFAULT_PREFETCH

    config = Config(workers=4, name="abc")
    assert config.endpoint.startswith("ipc://") and config.endpoint.endswith("abc.sock")
    assert config.slots >= 2 * config.workers
    assert Config(workers=1).slots // 2 >= DEFAULT_PREFETCH  # the server grants a feed all it asks


def test_toml_with_flags_over_it(tmp_path):
    path = tmp_path / "ringfeed.toml"
    path.write_text('data = "digits"\nbatch_size = 16\nseed = 3\n\n[[augment]]\nop = "flip_lr"\n')
    config = load_toml(path, batch_size=64, workers=None)
    assert config.batch_size == 64 and config.seed == 3
    assert config.data == str(tmp_path / "digits")
    assert config.augment == ({"op": "flip_lr"},)


def test_toml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("batch_size = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(bad)


def test_every_option_is_documented_and_the_readme_table_is_the_generated_one():
    """The reference table in README.md is ``reference_table()``, rendered from Config's metadata."""
    from dataclasses import fields
    from pathlib import Path

    from ringfeed.server.config import reference_table

    for option in fields(Config):
        assert option.metadata["doc"], f"{option.name} has no doc in its metadata"
        assert option.metadata["means"] or option.default is not None, f"{option.name}: say what None means"
    table = reference_table()
    assert [line.split("`")[1] for line in table.splitlines()[2:]] == [f.name for f in fields(Config)]
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start, end = readme.index("<!-- config:start -->\n"), readme.index("<!-- config:end -->")
    assert readme[start + len("<!-- config:start -->\n"):end] == table, \
        "README's configuration table differs from ringfeed.server.config.reference_table(): paste it in again"
