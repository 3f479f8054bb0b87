"""Bad Hydra-level input on the training command line (unknown group option, unknown key, a malformed override, a run
or sweep dir that cannot be created) is one line naming the field and what is allowed, before Hydra runs: checked
in-process (cli_checks.check_command_line) and through the real CLI (exit 2, nothing written)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lightning_ralora.cli.checks import PROG, _jobs, check_command_line
from lightning_ralora.run.compose import CONF_DIR, compose_config
from tests.conftest import run_cli

GRAMMAR = "(grammar: https://hydra.cc/docs/advanced/override_grammar/basic/)"


def _yaml_options(group: str) -> str:
    """The options of a config group as Hydra finds them: the group's yaml files in the package's conf/."""
    return ", ".join(sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml")))


def _unknown_adapter(option: str, close: str) -> str:
    return (
        f"{PROG}: adapter={option}: '{option}' is not an option of config group 'adapter' "
        f"(did you mean adapter={close}?); options: {_yaml_options('adapter')}"
    )


def _blocked(node: str, target: str, blocker: Path) -> str:
    return (
        f"{PROG}: {node}.dir: cannot create {target}: {blocker} is a file, not a directory "
        f"(set {node}.dir or paths.root_dir to a writable directory)"
    )


@pytest.fixture
def blocker(tmp_path: Path) -> Path:
    """A file where a run directory's parent should be."""
    path = tmp_path / "blocker"
    path.write_text("not a directory\n")
    return path


def test_unknown_group_option_lists_the_yaml_files(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert check_command_line(["adapter=lorra", f"hydra.run.dir={run_dir}"]) == [_unknown_adapter("lorra", "lora")]
    assert not run_dir.exists()


def test_unknown_option_of_another_group_lists_its_options() -> None:
    assert check_command_line(["debug=fats"]) == [
        f"{PROG}: debug=fats: 'fats' is not an option of config group 'debug' (did you mean debug=fast?); "
        f"options: {_yaml_options('debug')}"
    ]


def test_each_sweep_value_is_checked(tmp_path: Path) -> None:
    """The bad value is the second of its sweep: checked with the other overrides at their first value."""
    sweep = ["-m", "adapter=lora,lorra", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    assert check_command_line(sweep) == [_unknown_adapter("lorra", "lora")]
    assert not (tmp_path / "sweep").exists()


def test_sweep_jobs_are_one_per_value_not_the_product() -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(["adapter=lora,ralora", "seed=range(0,3)", "debug=fast"])
    assert _jobs(parsed) == [
        ["adapter=lora", "seed=0", "debug=fast"],
        ["adapter=ralora", "seed=0", "debug=fast"],
        ["adapter=lora", "seed=1", "debug=fast"],
        ["adapter=lora", "seed=2", "debug=fast"],
    ]


@pytest.mark.parametrize(
    ("override", "near"),
    [
        ("foo=1", "no existing key is close"),
        ("adapter.foo=1", "no existing key is close"),
        ("adapter.rr=4", "closest existing keys: adapter.r"),
        ("adaptr.r=4", "closest existing keys: adapter.r"),
        ("max_steps=5", "closest existing keys: trainer.max_steps"),
    ],
    ids=["top_level", "nested", "nested_close", "misspelt_section", "leaf_elsewhere"],
)
def test_unknown_key_says_plus_and_the_closest_keys(override: str, near: str) -> None:
    key, value = override.split("=")
    assert check_command_line([override]) == [
        f"{PROG}: {override}: '{key}' is not in the config ({near}); to add a new key use +{key}={value}"
    ]
    if near.startswith("closest"):
        assert OmegaConf.select(compose_config(), near.split(": ")[1]) is not None  # the suggestion is a real key


def test_adding_a_key_that_exists_says_how_to_set_it() -> None:
    assert check_command_line(["+seed=1"]) == [
        f"{PROG}: +seed=1: 'seed' is already in the config: set it with seed=1 (or ++seed=1)"
    ]


@pytest.mark.parametrize(
    ("override", "why"),
    [
        ("seed=[1,2", "no viable alternative at input '[1,2'"),
        ("seed='a", 'unexpected "\'a" at position 5'),
        ("=3", None),
    ],
    ids=["unclosed_list", "unclosed_quote", "no_key"],
)
def test_malformed_override_is_one_line(override: str, why: str | None) -> None:
    expected = (
        f"{PROG}: {override}: cannot parse this override: {why} {GRAMMAR}"
        if why
        else f"{PROG}: {override}: cannot parse this override: no key before '=' (write key=value)"
    )
    assert check_command_line([override]) == [expected]


def test_wrong_type_for_a_typed_key() -> None:
    assert check_command_line(["hydra.job.chdir=maybe"]) == [
        f"{PROG}: hydra.job.chdir=maybe: Value 'maybe' is not a valid bool (type str)"
    ]


def test_sweep_without_multirun() -> None:
    assert check_command_line(["adapter=lora,ralora"]) == [
        f"{PROG}: adapter=lora,ralora: a sweep needs -m (--multirun), one job per value; for a list write "
        "adapter=[a,b], for a string with commas quote it"
    ]


@pytest.mark.parametrize(
    ("override", "why"),
    [
        ("optim.lr=tag(log, interval(-1e-5, 1e-2))", "a log interval needs 0 < low, got low=-1e-05"),
        ("optim.lr=tag(log, interval(0, 1e-2))", "a log interval needs 0 < low, got low=0.0"),
        ("optim.lr=interval(1e-2, 1e-5)", "interval(low, high) needs low <= high, got 0.01 > 1e-05"),
        ("adapter.r=range(8,4)", "this sweep holds no value"),
        ("adapter.r=range(1,5,0)", "range() arg 3 must not be zero"),
    ],
)
def test_an_optuna_search_space_optuna_would_refuse_is_one_line(override: str, why: str) -> None:
    """Optuna refuses these ranges with a traceback once the sweep has started (optuna 2.10: `low` must be smaller
    than or equal to `high`, larger than 0 for a log distribution); here they are one line before anything runs."""
    assert check_command_line(["hparams_search=lr", override]) == [f"{PROG}: {override}: {why}"]


@pytest.mark.parametrize(("override", "why"), [("seed=range(1,5,0)", "range() arg 3 must not be zero"),
                                               ("seed=range(3,1)", "this sweep holds no value")])  # fmt: skip
def test_a_sweep_without_values_is_one_line_in_a_basic_multirun(override: str, why: str) -> None:
    """A range stepping by 0 was a traceback from the checks themselves (Hydra raises while listing its values); an
    empty one would start a sweep of no job."""
    assert check_command_line(["-m", override]) == [f"{PROG}: {override}: {why}"]


def test_a_bad_search_space_in_a_users_hparams_search_config_is_named(tmp_path: Path) -> None:
    """The sweeper's `params` from a config (not the command line) are checked too, named by their config key; a
    search-space key set as hydra.sweeper.params.<key> on the command line gets the form that works."""
    folder = tmp_path / "conf" / "hparams_search"
    folder.mkdir(parents=True)
    text = (Path(CONF_DIR) / "hparams_search" / "lr.yaml").read_text()
    (folder / "my_lr.yaml").write_text(text.replace("interval(1e-5, 1e-2)", "interval(1e-2, 1e-5)"))
    assert check_command_line(["--config-dir", str(tmp_path / "conf"), "hparams_search=my_lr"]) == [
        f"{PROG}: hydra.sweeper.params.optim.lr=tag(log, interval(1e-2, 1e-5)): interval(low, high) needs "
        "low <= high, got 0.01 > 1e-05"
    ]
    override = "hydra.sweeper.params.optim.lr='interval(1e-4, 1e-3)'"
    assert check_command_line(["hparams_search=lr", override]) == [
        f"{PROG}: {override}: a search-space key holds dots, so it cannot be set as hydra.sweeper.params.<key> on "
        "the command line; give the sweep itself: optim.lr=interval(1e-4, 1e-3)"
    ]


def test_run_dir_under_a_file(blocker: Path) -> None:
    assert check_command_line([f"hydra.run.dir={blocker}/run"]) == [_blocked("hydra.run", f"{blocker}/run", blocker)]
    assert blocker.read_text() == "not a directory\n"


def test_run_dir_from_paths_under_a_file(blocker: Path) -> None:
    """The default run dir (${paths.output_dir}/${experiment_name}/${run_identity:}/seed${seed}) resolved."""
    problems = check_command_line([f"paths.root_dir={blocker}"])
    assert len(problems) == 1
    target = f"{blocker}/outputs/default/lora-tiny_llama-planted-"
    assert problems[0].startswith(f"{PROG}: hydra.run.dir: cannot create {target}"), problems
    assert problems[0].endswith(f"/seed0: {blocker} is a file, not a directory (set hydra.run.dir or paths.root_dir "
                                "to a writable directory)")  # fmt: skip


def test_run_dir_with_a_runtime_only_hydra_value(blocker: Path) -> None:
    """`${hydra:job.num}` has no value before the run: the part before it is checked."""
    problems = check_command_line([f"hydra.run.dir={blocker}/${{hydra:job.num}}/x"])
    assert problems == [_blocked("hydra.run", f"{blocker}/...", blocker)]


def test_sweep_dir_under_a_file(blocker: Path) -> None:
    problems = check_command_line(["-m", "adapter=lora,ralora", f"hydra.sweep.dir={blocker}/sweep"])
    assert len(problems) == 1
    assert problems[0].startswith(f"{PROG}: hydra.sweep.dir: cannot create {blocker}/sweep/lora-tiny_llama-planted-")
    assert f"/seed0: {blocker} is a file, not a directory" in problems[0]


def test_unknown_config_dir_and_name(tmp_path: Path) -> None:
    assert check_command_line(["--config-dir", str(tmp_path / "nope")]) == [
        f"{PROG}: --config-dir {tmp_path / 'nope'}: not a directory (it adds a config directory to the search)"
    ]
    assert check_command_line(["-cn", "nope"]) == [
        f"{PROG}: --config-name nope: no such primary config; the search path has: config"
    ]


@pytest.fixture
def user_conf(tmp_path: Path) -> Path:
    """A user config directory with one extra adapter option (a copy of lora.yaml under another name)."""
    (tmp_path / "conf" / "adapter").mkdir(parents=True)
    text = (Path(CONF_DIR) / "adapter" / "lora.yaml").read_text().replace("name: lora", "name: my_lora")
    (tmp_path / "conf" / "adapter" / "my_lora.yaml").write_text(text)
    return tmp_path / "conf"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["experiment=gralora_code_llama", "debug=rehearsal"],
        ["-m", "adapter=lora,ralora", "seed=0,1"],
        ["hparams_search=lr"],  # a multirun by its config (hydra.mode), no -m
        ["hparams_search=rank", "optim.lr=tag(log, interval(1e-5, 1e-3))", "adapter.r=range(4,20,4)"],
        ["hydra.searchpath=[file://{conf}]", "adapter=my_lora"],
        ["--config-dir", "{conf}", "adapter=my_lora"],
    ],
    ids=["default", "experiment", "multirun", "optuna", "optuna_cli_space", "searchpath", "config_dir"],
)
def test_valid_command_lines_have_no_problem(tmp_path: Path, user_conf: Path, argv: list[str]) -> None:
    dirs = [f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    assert check_command_line([a.format(conf=user_conf) for a in argv] + dirs) == []
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


def test_user_option_needs_its_search_path(user_conf: Path) -> None:
    """Without the searchpath the user's option is unknown; with it, it is listed among the options."""
    assert check_command_line(["adapter=my_lora"])[0].startswith(f"{PROG}: adapter=my_lora: 'my_lora' is not")
    (problem,) = check_command_line([f"hydra.searchpath=[file://{user_conf}]", "adapter=my_lorra"])
    options = sorted([*_yaml_options("adapter").split(", "), "my_lora"])
    assert problem == (
        f"{PROG}: adapter=my_lorra: 'my_lorra' is not an option of config group 'adapter' (did you mean "
        f"adapter=my_lora?); options: {', '.join(options)}"
    )


@pytest.mark.parametrize(
    "argv",
    [["--cfg", "job", "foo=1"], ["--help"], ["--hydra-help"], ["--info"], ["--version"]],
    ids=["cfg", "help", "hydra_help", "info", "version"],
)
def test_hydra_output_flags_are_left_to_hydra(argv: list[str]) -> None:
    assert check_command_line(argv) == []


# Through the real CLI: these pass once train.main() calls cli_checks.exit_on_bad_command_line before Hydra runs.


def _one_line_exit_2(res, expected: str) -> None:
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines() == [expected]


def test_cli_unknown_group_option(tmp_path: Path) -> None:
    res = run_cli(tmp_path / "run", "adapter=lorra")
    _one_line_exit_2(res, _unknown_adapter("lorra", "lora"))
    assert not (tmp_path / "run").exists()


def test_cli_unknown_key(tmp_path: Path) -> None:
    res = run_cli(tmp_path / "run", "adapter.rr=4")
    _one_line_exit_2(
        res, f"{PROG}: adapter.rr=4: 'adapter.rr' is not in the config (closest existing keys: adapter.r); "
        "to add a new key use +adapter.rr=4"
    )  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_cli_run_dir_under_a_file(blocker: Path) -> None:
    res = run_cli(blocker / "run")
    _one_line_exit_2(res, _blocked("hydra.run", f"{blocker}/run", blocker))
    assert blocker.read_text() == "not a directory\n"


def test_cli_sweep_value_unknown(tmp_path: Path) -> None:
    """The bad value is checked before the first job runs: no sweep dir is created."""
    res = run_cli(tmp_path / "run", "-m", "adapter=lorra,lora", "debug=fast", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    _one_line_exit_2(res, _unknown_adapter("lorra", "lora"))
    assert not (tmp_path / "sweep").exists()
